"""One module per op or model; each defines `cases() -> list[Case]`. Add a module's name here to put it in the suite."""
CASE_MODULES = [
    "topk_patch_gather",
    "varlen_attention",
    "exit_compact",
    "dyn_perceiver",
    "lookwhere",
    "serving",
]
