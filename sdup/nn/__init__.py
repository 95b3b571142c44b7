from .attention import (BACKENDS, AttentionOutput, attention, attention_chunked, attention_layer, attention_math,
                        attention_probs, get_attention_backend, merge_heads, project_qkv, set_attention_backend,
                        split_heads, use_attention_backend)
from .layers import (GEGLU, Attention, Conv2d, Downsample, GroupNorm32, ResBlock, SpatialTransformer, TransformerBlock,
                     Upsample, group_norm, group_norm_fp32, timestep_embedding)
from .hooks import attention_hooks, attention_layers, match_layers
