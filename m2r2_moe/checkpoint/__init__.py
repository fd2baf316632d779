"""Checkpoints: reading safetensors folders straight into the offloaded layout (`loader.from_pretrained`,
`reader`, `weight_map`, the memory `plan`) and writing an offloaded model back as a standard checkpoint
(`writer`). Nothing is imported here, so that the writer can be used without the loader."""
