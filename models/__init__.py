"""Token models: the Gemma-style decoder and the character tokenizer."""
from chorus.models.decoder import Decoder
from chorus.models.decoder import DecoderConfig
from chorus.models.decoder import DecoderOutput
from chorus.models.decoder import forward_completions
from chorus.models.decoder import init_cache
from chorus.models.decoder import init_params
from chorus.models.decoder import KVCache
from chorus.models.decoder import left_pad_prompts
from chorus.models.decoder import params_from_bytes
from chorus.models.decoder import params_to_bytes
from chorus.models.decoder import positions_from_mask
from chorus.models.decoder import right_pad_completions
from chorus.models.tokenizer import BOS_ID
from chorus.models.tokenizer import CharTokenizer
from chorus.models.tokenizer import EOS_ID
from chorus.models.tokenizer import PAD_ID
