"""The benchmark suite behind `python -m lookfast bench`: cases (one module per op or model in `cases/`), timing,
machine ceilings and the report. Installed with the package so the main job runs anywhere."""
