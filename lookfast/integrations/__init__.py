"""Adapters to other systems. Each submodule imports its system lazily and is never imported by `import lookfast`:
`lookfast.integrations.ray` (Ray Data batch inference, `pip install 'lookfast[ray]'`)."""
