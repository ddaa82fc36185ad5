"""Writers: a loaded model back to the ecosystem's layouts (safetensors + config.json, GGUF)."""
