"""The named Gemma configs have the published sizes; config.json round-trips."""
import jax
import pytest

from chorus import models
from chorus.models import hf_layout

# Parameter counts of the Gemma (2024, table 2) and Gemma 2 (2024, table 2) reports: the
# embedding, and the rest. The embedding counts are of the reports' tables of 256,128 rows
# (256,000 for Gemma 2 27B); the released checkpoints (and HF's config.json) have 256,000.
PUBLISHED = {
    'gemma_2b': (524_550_144, 1_981_884_416, 256_128),
    'gemma_7b': (786_825_216, 7_751_248_896, 256_128),
    'gemma2_2b': (590_118_912, 2_024_517_888, 256_128),
    'gemma2_9b': (917_962_752, 8_324_201_984, 256_128),
    'gemma2_27b': (1_179_648_000, 26_047_480_320, 256_000),
}


def _counts(config: models.DecoderConfig) -> dict[str, int]:
  """Parameters by part, from shapes alone (jax.eval_shape allocates nothing)."""
  shapes = jax.eval_shape(lambda rng: models.init_params(config, rng), jax.random.PRNGKey(0))
  counts = {'embedding': 0, 'value_head': 0, 'rest': 0}
  for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
    name = jax.tree_util.keystr(path)
    part = 'embedding' if 'embedder' in name else 'value_head' if 'value_head' in name else 'rest'
    counts[part] += leaf.size
  return counts


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_named_config_has_the_published_parameter_count(name):
  embedding, rest, table_rows = PUBLISHED[name]
  make = getattr(models.DecoderConfig, name)
  counts = _counts(make(vocab_size=table_rows))
  print(f'{name}: {counts}, total without the value head '
        f'{counts["embedding"] + counts["rest"]:,}')
  assert (counts['embedding'], counts['rest']) == (embedding, rest)
  released = make()
  assert released.vocab_size == 256_000
  assert counts['value_head'] == released.embed_dim + 1  # Chorus's own, reported apart.


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_named_config_round_trips_through_config_json(name):
  config = getattr(models.DecoderConfig, name)()
  hf = hf_layout.hf_config_from_decoder(config, bos_token_id=2, pad_token_id=0,
                                        torch_dtype='bfloat16')
  assert hf['model_type'] == ('gemma2' if name.startswith('gemma2') else 'gemma')
  assert hf_layout.decoder_config_from_hf(hf) == config


def test_gemma2_27b_scales_queries_by_embed_dim_over_heads_and_alternates_local_first():
  config = models.DecoderConfig.gemma2_27b()
  assert config.query_pre_attn_scalar == config.embed_dim // config.num_heads == 144
  assert [config.layer_window(layer) for layer in range(3)] == [4096, None, 4096]


def test_transformers_4_gemma2_config_without_layer_types_alternates_local_first():
  hf = hf_layout.hf_config_from_decoder(models.DecoderConfig.gemma2_2b(), bos_token_id=2,
                                        pad_token_id=0, torch_dtype='float32')
  del hf['layer_types']
  hf['rope_parameters'] = {'rope_type': 'default', 'rope_theta': 10_000.0}
  assert hf_layout.decoder_config_from_hf(hf) == models.DecoderConfig.gemma2_2b()


@pytest.mark.parametrize('changes, message', [
    (dict(model_type='llama'), "model_type 'llama'"),
    (dict(hidden_activation='gelu'), "hidden_activation 'gelu'"),
    (dict(rope_scaling={'type': 'linear', 'factor': 2.0}), 'RoPE scaling'),
    (dict(hidden_size=None), "no 'hidden_size'"),
])
def test_unsupported_config_json_is_refused_with_the_field(changes, message):
  hf = hf_layout.hf_config_from_decoder(models.DecoderConfig.gemma_2b(), bos_token_id=2,
                                        pad_token_id=0, torch_dtype='float32')
  hf.update(changes)
  with pytest.raises(ValueError, match=message):
    hf_layout.decoder_config_from_hf(hf)


def test_a_config_transformers_cannot_express_is_refused_on_export():
  config = models.DecoderConfig(vocab_size=10, num_layers=1, embed_dim=8, num_heads=2,
                                num_kv_heads=1, head_dim=4, mlp_dim=16, max_seq_len=8,
                                logit_softcap=30.0)
  with pytest.raises(ValueError, match=r"\['logit_softcap'\] need Gemma 2"):
    hf_layout.model_type(config)
