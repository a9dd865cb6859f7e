"""The model config: :class:`ModelConfig` (``model.py``), its HF ``config.json`` mapping
(``hf_json.py``), exact parameter counting (``counting.py``) and the block-type constants
(``blocks.py``). Everything is importable from here, as before the split."""
from star_elastic_jax.config.blocks import BLOCK_NAMES, BLOCK_TYPES, MOE_IMPLS, SSD_IMPLS
from star_elastic_jax.config.counting import ParamCount, block_param_count, count_params
from star_elastic_jax.config.model import PRESETS, LayerSizes, ModelConfig, per_layer_sizes

__all__ = ["BLOCK_NAMES", "BLOCK_TYPES", "LayerSizes", "MOE_IMPLS", "ModelConfig", "PRESETS", "ParamCount",
           "SSD_IMPLS", "block_param_count", "count_params", "per_layer_sizes"]
