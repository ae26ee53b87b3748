"""Shapes, causality and bookkeeping of the decoder and the composition."""

import dataclasses
import functools

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from calm_jax.models import bridges as B
from calm_jax.models import composition as C
from calm_jax.models import transformer as T

VOCAB = 40
AUG = T.DecoderConfig(vocab_size=VOCAB, d_model=16, num_layers=4, num_heads=2,
                      d_ff=32, max_len=24)
ANCHOR = T.DecoderConfig(vocab_size=VOCAB, d_model=32, num_layers=4,
                         num_heads=4, num_kv_heads=2, d_ff=64, max_len=24)
FAMILIES = {
    'llama_like': {},
    'gpt2_like': dict(norm='layernorm', position='learned', mlp='gelu',
                      tie_embeddings=True, use_bias=True),
    'gemma_like': dict(mlp='gated_gelu', scale_embeddings=True,
                       logit_softcap=30.0),
    'separate_embeddings': dict(tie_embeddings=False, mlp='relu',
                                position='none'),
}


def _noisy(params, seed=1, scale=0.2):
  """Perturbs every leaf so zero-initialised bridge outputs matter.

  The noise is drawn on the host: with jax.random, jitted, every tree
  compiled its own sampler (~7.5 s of a 17-s test on 2 cores)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda x: x + jnp.asarray(scale * rng.standard_normal(x.shape),
                                x.dtype), params)


# Every option of our bridge on: its parameters are a superset.
OURS_ALL = C.BridgeConfig.make('ours', options=dict(
    recency_bias=True, proj_hidden=8, gate=True, source_gate=True,
    anchor_gate=True))


@functools.cache  # One init per model: tests copy, never mutate, params.
def _composed(prompt_only=False, pairs=((1, 1), (3, 3))):
  model = C.ComposedLM(ANCHOR, (C.Augmenting('a', AUG, pairs),),
                       prompt_only=prompt_only)
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, VOCAB)
  params = nn.meta.unbox(jax.jit(model.init)(
      jax.random.key(0), tokens, prompt_len=jnp.array([3, 5]))['params'])
  return model, params, tokens


def _bridge_inputs(bridge, t):
  """Anchor (32 wide) and m_A (16 wide) states over `t` positions, the
  positions, and `bridge`'s initial params on them."""
  anchor_h = jax.random.normal(jax.random.key(0), (1, t, 32))
  aug_h = jax.random.normal(jax.random.key(1), (1, t, 16))
  positions = jnp.arange(t)[None]
  params = nn.meta.unbox(bridge.init(jax.random.key(2), anchor_h, aug_h,
                                     positions=positions)['params'])
  return anchor_h, aug_h, positions, params


def _gated_bridge(**gate):
  """A content-free bridge with `gate` on, its inputs over 5 positions and
  its initial params."""
  bridge = B.OursBridge(d_model=32, num_heads=4, recency_bias=True,
                        recency_max_slope=50.0, anchor_queries=False, **gate)
  return (bridge, *_bridge_inputs(bridge, 5))


class DecoderTest(parameterized.TestCase):

  @parameterized.named_parameters(
      *[(name, kw) for name, kw in FAMILIES.items()])
  def test_shapes_and_causality(self, kw):
    cfg = T.DecoderConfig(vocab_size=VOCAB, d_model=32, num_layers=2,
                          num_heads=4, d_ff=64, max_len=16, **kw)
    model = T.Decoder(cfg)
    tokens = jax.random.randint(jax.random.key(0), (3, 10), 0, VOCAB)
    params = model.init(jax.random.key(1), tokens)['params']
    logits = model.apply({'params': params}, tokens)
    self.assertEqual(logits.shape, (3, 10, VOCAB))
    self.assertEqual(logits.dtype, jnp.float32)
    changed = tokens.at[:, 6:].set((tokens[:, 6:] + 1) % VOCAB)
    logits2 = model.apply({'params': params}, changed)
    np.testing.assert_array_equal(logits[:, :6], logits2[:, :6])
    self.assertGreater(float(jnp.abs(logits[:, 6:] - logits2[:, 6:]).max()),
                       1e-4)

  def test_every_param_has_logical_axes(self):
    model = C.ComposedLM(ANCHOR, (C.Augmenting('a', AUG, ((3, 3),)),),
                         bridge=OURS_ALL)
    boxed = jax.eval_shape(model.init, jax.random.key(0),
                           jnp.zeros((1, 4), jnp.int32))
    leaves = jax.tree_util.tree_leaves(
        boxed['params'], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    self.assertNotEmpty(leaves)
    for leaf in leaves:
      self.assertIsInstance(leaf, nn.Partitioned)
      self.assertLen(leaf.names, len(leaf.value.shape))

  def test_hidden_states_and_residual_adds(self):
    model = T.Decoder(ANCHOR)
    tokens = jnp.arange(8)[None] % VOCAB
    params = model.init(jax.random.key(0), tokens)['params']
    logits, hidden = model.apply({'params': params}, tokens,
                                 return_hidden=(1, 3))
    self.assertEqual(sorted(hidden), [1, 3])
    self.assertEqual(hidden[1].shape, (1, 8, ANCHOR.d_model))
    np.testing.assert_allclose(
        model.apply({'params': params}, tokens, method='hidden_states',
                    layers=(1,))[1], hidden[1], rtol=1e-6)
    zero = {1: jnp.zeros_like(hidden[1])}
    np.testing.assert_allclose(
        model.apply({'params': params}, tokens, residual_adds=zero), logits,
        rtol=1e-6)
    bumped = model.apply({'params': params}, tokens,
                         residual_adds={1: jnp.ones_like(hidden[1])})
    self.assertGreater(float(jnp.abs(bumped - logits).max()), 1e-3)

  def test_config_errors_name_the_field(self):
    with self.assertRaisesRegex(ValueError, r'model\.num_heads'):
      T.DecoderConfig(vocab_size=8, d_model=30, num_layers=1, num_heads=4,
                      d_ff=8).validate()
    with self.assertRaisesRegex(ValueError, r'model\.norm.*rmsnorm'):
      T.DecoderConfig(vocab_size=8, d_model=32, num_layers=1, num_heads=4,
                      d_ff=8, norm='batchnorm').validate()
    with self.assertRaisesRegex(ValueError, r'unknown architecture fields'):
      T.DecoderConfig.from_dict({'vocab_size': 8, 'dmodel': 3})


class PairSelectionTest(parameterized.TestCase):

  @parameterized.parameters(
      (4, 8, 4, ((3, 7),)),
      (8, 8, 4, ((3, 3), (7, 7))),
      (12, 6, 4, ((3, 1), (7, 3), (11, 5))),
      (4, 4, 1, ((0, 0), (1, 1), (2, 2), (3, 3))),
  )
  def test_paper_rule(self, n_aug, n_anchor, k, expected):
    self.assertEqual(C.select_pairs(n_aug, n_anchor, k), expected)

  def test_no_pair_is_an_error(self):
    with self.assertRaisesRegex(ValueError, r'every_k=8 yields no layer pair'):
      C.select_pairs(4, 8, 8)

  def test_out_of_range_pairs(self):
    with self.assertRaisesRegex(ValueError, r'augmenting layer 4 is out of'):
      C.validate_pairs([(4, 0)], 4, 8, 'models.augmenting.a.pairs')
    with self.assertRaisesRegex(ValueError, r'anchor layer -2 is out of'):
      C.validate_pairs([(0, -2)], 4, 8, 'models.augmenting.a.pairs')
    # -1 is the anchor's embeddings, the input of its first block.
    self.assertEqual(C.validate_pairs([(0, -1)], 4, 8, 'pairs'), ((0, -1),))


class CompositionTest(parameterized.TestCase):

  def test_param_tree_and_count(self):
    model, params, _ = _composed()
    self.assertEqual(sorted(params), ['anchor', 'aug_a', 'composition'])
    self.assertEqual(sorted(params['composition']), ['a_1_1', 'a_3_3'])
    d_a, d_b, n = AUG.d_model, ANCHOR.d_model, 2
    # The paper's n * (D_A * D_B + 4 * D_B^2), plus two RMSNorm scales.
    self.assertEqual(T.count_params(params['composition']),
                     n * (d_a * d_b + 4 * d_b * d_b + 2 * d_b))

  def test_starts_as_the_anchor(self):
    model, params, tokens = _composed()
    composed = model.apply({'params': params}, tokens)
    anchor = T.Decoder(ANCHOR).apply({'params': params['anchor']}, tokens)
    np.testing.assert_allclose(composed, anchor, atol=1e-6)

  @parameterized.parameters(False, True)
  def test_causal_through_every_path(self, prompt_only):
    model, params, tokens = _composed(prompt_only)
    params = _noisy(params)
    plen = jnp.array([3, 5])
    apply = jax.jit(model.apply)
    base = apply({'params': params}, tokens, prompt_len=plen)
    for cut in (1, 4, 7, 11):
      changed = tokens.at[:, cut:].set((tokens[:, cut:] + 7) % VOCAB)
      out = apply({'params': params}, changed, prompt_len=plen)
      np.testing.assert_array_equal(base[:, :cut], out[:, :cut])
      self.assertGreater(float(jnp.abs(base[:, cut:] - out[:, cut:]).max()),
                         1e-4)

  def test_augmenting_model_changes_the_output(self):
    model, params, tokens = _composed()
    params = _noisy(params)
    other = dict(params, aug_a=_noisy(params['aug_a'], seed=5))
    apply = jax.jit(model.apply)
    a = apply({'params': params}, tokens)
    b = apply({'params': other}, tokens)
    self.assertGreater(float(jnp.abs(a - b).max()), 1e-3)

  def test_prompt_only_bridge_ignores_later_states(self):
    bridge = C.PaperBridge(d_model=32, num_heads=4)
    anchor_h = jax.random.normal(jax.random.key(0), (2, 10, 32))
    aug_h = jax.random.normal(jax.random.key(1), (2, 10, 16))
    plen = jnp.array([3, 6])
    params = _noisy(nn.meta.unbox(bridge.init(
        jax.random.key(2), anchor_h, aug_h, prompt_len=plen)['params']))
    run = lambda h: bridge.apply({'params': params}, anchor_h, h,
                                 prompt_len=plen)
    out = run(aug_h)
    late = aug_h.at[:, 6:].add(1.0).at[0, 3:].add(1.0)
    np.testing.assert_allclose(out, run(late), atol=1e-6)
    early = aug_h.at[:, 0].add(1.0)
    self.assertGreater(float(jnp.abs(out - run(early)).max()), 1e-4)

  def test_paper_bridge_is_the_formula(self):
    """PaperBridge against a hand-written einsum of f_cross(f_proj(H_A), H_B).

    proj = rms(H_A W_p); q = rms(H_B) W_q, k = proj W_k, v = proj W_v;
    a = softmax(q k^T / sqrt(d) + causal mask); out = a v W_o.
    """
    b, t, d_a, d_b, h = 2, 7, 16, 32, 4
    dh = d_b // h
    bridge = C.PaperBridge(d_model=d_b, num_heads=h)
    anchor_h = jax.random.normal(jax.random.key(0), (b, t, d_b))
    aug_h = jax.random.normal(jax.random.key(1), (b, t, d_a))
    p = _noisy(nn.meta.unbox(bridge.init(jax.random.key(2), anchor_h,
                                         aug_h)['params']))
    got = bridge.apply({'params': p}, anchor_h, aug_h)

    def rms(x, scale):
      x = np.asarray(x, np.float64)
      return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * scale
    w = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), p)
    proj = rms(np.einsum('bsa,ad->bsd', aug_h, w['proj']['kernel']),
               w['kv_norm']['scale'])
    q = np.einsum('btd,dhe->bthe', rms(anchor_h, w['q_norm']['scale']),
                  w['query']['kernel'])
    k = np.einsum('bsd,dhe->bshe', proj, w['key']['kernel'])
    v = np.einsum('bsd,dhe->bshe', proj, w['value']['kernel'])
    logits = np.einsum('bthe,bshe->bhts', q, k) / np.sqrt(dh)
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    want = np.einsum('bhts,bshe,hed->btd', a, v, w['out']['kernel'])
    np.testing.assert_allclose(got, want, atol=2e-5)
    # And at init the output projection is zero: the bridge writes nothing.
    fresh = nn.meta.unbox(bridge.init(jax.random.key(2), anchor_h,
                                      aug_h)['params'])
    self.assertEqual(float(jnp.abs(bridge.apply({'params': fresh}, anchor_h,
                                                aug_h)).max()), 0.0)

  def test_gate_starts_closed_and_opens(self):
    bridge = B.OursBridge(d_model=32, num_heads=4, gate=True)
    anchor_h = jax.random.normal(jax.random.key(0), (1, 5, 32))
    aug_h = jax.random.normal(jax.random.key(1), (1, 5, 16))
    params = nn.meta.unbox(bridge.init(jax.random.key(2), anchor_h,
                                       aug_h)['params'])
    self.assertGreater(float(jnp.abs(params['out']['kernel']).max()), 0.0)
    loss = lambda p: (bridge.apply({'params': p}, anchor_h, aug_h) ** 2 +
                      bridge.apply({'params': p}, anchor_h, aug_h)).sum()
    self.assertEqual(float(jnp.abs(bridge.apply(
        {'params': params}, anchor_h, aug_h)).max()), 0.0)  # Closed.
    self.assertGreater(float(jnp.abs(jax.grad(loss)(params)['gate'])[0]),
                       0.0)  # And it trains.

  def test_source_gate_silences_a_position_from_m_a_state(self):
    bridge, anchor_h, aug_h, positions, params = _gated_bridge(
        source_gate=True)
    # Starts half open on every head, and silent (zero output projection).
    self.assertEqual(float(jnp.abs(params['source_gate']['kernel']).max()),
                     0.0)
    params['out'] = _noisy(params['out'])
    apply = lambda p, h: bridge.apply({'params': p}, anchor_h, h,
                                      positions=positions)
    half = apply(params, aug_h)
    # A bias of -inf closes it: nothing is written, whatever m_A holds.
    shut = dict(params, source_gate=dict(
        params['source_gate'], bias=jnp.full((4,), -1e4)))
    self.assertLess(float(jnp.abs(apply(shut, aug_h)).max()), 1e-6)
    # Fully open doubles what the half-open gate lets through.
    wide = dict(params, source_gate=dict(
        params['source_gate'], bias=jnp.full((4,), 1e4)))
    np.testing.assert_allclose(apply(wide, aug_h), 2 * half, rtol=1e-5,
                               atol=1e-6)
    # The gate reads m_A's state at each position: it is trained.
    grad = jax.grad(lambda p: (apply(p, aug_h) ** 2).sum())(params)
    self.assertGreater(float(jnp.abs(grad['source_gate']['kernel']).sum()),
                       0.0)

  def test_anchor_gate_silences_a_position_from_the_anchor_state(self):
    bridge, anchor_h, aug_h, positions, params = _gated_bridge(
        anchor_gate=True)
    self.assertEqual(float(jnp.abs(params['anchor_gate']['kernel']).max()),
                     0.0)
    params['out'] = _noisy(params['out'])
    apply = lambda p, a: bridge.apply({'params': p}, a, aug_h,
                                      positions=positions)
    half = apply(params, anchor_h)
    wide = dict(params, anchor_gate=dict(
        params['anchor_gate'], bias=jnp.full((4,), 1e4)))
    np.testing.assert_allclose(apply(wide, anchor_h), 2 * half, rtol=1e-5,
                               atol=1e-6)
    # A gate that reads one direction of the anchor's state shuts the
    # positions whose state points along it, and only those.
    direction = jnp.zeros((32,)).at[0].set(1.0)
    marked = anchor_h.at[0, 2].set(10.0 * direction)
    shut = dict(params, anchor_gate=dict(
        kernel=jnp.broadcast_to(-1e4 * direction[:, None], (32, 4)),
        bias=jnp.full((4,), 1e4)))
    out = apply(shut, marked)
    self.assertLess(float(jnp.abs(out[0, 2]).max()), 1e-6)
    self.assertGreater(float(jnp.abs(out[0, 3]).max()), 1e-3)
    # The gate reads the anchor's state: it is trained.
    grad = jax.grad(lambda p: (apply(p, anchor_h) ** 2).sum())(params)
    self.assertGreater(float(jnp.abs(grad['anchor_gate']['kernel']).sum()),
                       0.0)

  def test_recency_bias_is_the_closed_form_and_learnt(self):
    bridge = B.OursBridge(d_model=32, num_heads=4, recency_bias=True)
    t = 6
    anchor_h, aug_h, positions, params = _bridge_inputs(bridge, t)
    # Content-free logits leave only the bias: head h weighs slot s <= t by
    # exp(-slope_h * (t - s)), slopes starting at 1, 1/4, 1/16, 1/64.
    # (Geometric from 1 to 1/64 for any head count: no slope underflows.)
    params['query']['kernel'] = jnp.zeros_like(params['query']['kernel'])
    _, state = bridge.apply({'params': params}, anchor_h, aug_h,
                            positions=positions, mutable=['intermediates'])
    probs = state['intermediates']['attention'][0][0]  # [h, t, s]
    slopes = 4.0 ** -np.arange(4)
    dist = np.arange(t)[:, None] - np.arange(t)[None]
    want = np.where(dist >= 0, np.exp(-slopes[:, None, None] * dist), 0.0)
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(probs, want, atol=1e-6)
    # The slopes are trainable.
    params['out'] = _noisy(params['out'])  # Zero-initialised otherwise.

    def loss(p):
      return bridge.apply({'params': p}, anchor_h, aug_h,
                          positions=positions).sum()
    self.assertGreater(float(jnp.abs(jax.grad(loss)(params)['recency_slope'])
                             .sum()), 0.0)
    with self.assertRaisesRegex(ValueError, 'positions'):
      bridge.apply({'params': params}, anchor_h, aug_h)
    # Without anchor queries the weights are the bias alone, whatever the
    # anchor holds, and there are no query or key projections.
    free = B.OursBridge(d_model=32, num_heads=4, recency_bias=True,
                        anchor_queries=False)
    free_params = nn.meta.unbox(free.init(
        jax.random.key(2), anchor_h, aug_h,
        positions=positions)['params'])
    self.assertEmpty({'query', 'key', 'q_norm'} & set(free_params))
    free_params['out'] = _noisy(free_params['out'])
    outs = []
    for h_b in (anchor_h, -3.0 * anchor_h + 1.0):
      out, state = free.apply({'params': free_params}, h_b, aug_h,
                              positions=positions, mutable=['intermediates'])
      np.testing.assert_allclose(state['intermediates']['attention'][0][0],
                                 want, atol=1e-6)
      outs.append(out)
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)
    with self.assertRaisesRegex(ValueError, r'composition\.anchor_queries='
                                r'False needs composition\.recency_bias=True'):
      C.BridgeConfig.make('ours', options=dict(anchor_queries=False))
    # recency_max_slope scales every head's initial slope.
    sharp = B.OursBridge(d_model=32, num_heads=4, recency_bias=True,
                         recency_max_slope=8.0)
    init = sharp.init(jax.random.key(2), anchor_h, aug_h,
                      positions=positions)['params']['recency_slope']
    np.testing.assert_allclose(jax.nn.softplus(nn.meta.unbox(init)),
                               8.0 * slopes, rtol=1e-5)

  def test_bridge_options_read_back_from_params(self):
    anchor_h = jnp.ones((1, 4, 32))
    aug_h = jnp.ones((1, 4, 16))
    positions = jnp.arange(4)[None]
    params = C.PaperBridge(d_model=32, num_heads=4).init(
        jax.random.key(0), anchor_h, aug_h)['params']
    self.assertEqual(C.bridge_config_of({'a_0_1': nn.meta.unbox(params)}),
                     C.BridgeConfig('paper', 4))
    for kw in (dict(num_heads=2, recency_bias=True),
               dict(num_heads=4, recency_bias=True, anchor_queries=False),
               dict(num_heads=4, recency_bias=True, anchor_queries=False,
                    proj_hidden=24),
               dict(num_heads=4, gate=True),
               dict(num_heads=4, source_gate=True),
               dict(num_heads=4, anchor_gate=True)):
      params = B.OursBridge(d_model=32, **kw).init(
          jax.random.key(0), anchor_h, aug_h, positions=positions)['params']
      heads = kw.pop('num_heads')
      want = C.BridgeConfig.make('ours', heads, dict(
          dict(recency_bias=False, anchor_queries=True, proj_hidden=0,
               gate=False, source_gate=False, anchor_gate=False), **kw))
      self.assertEqual(C.bridge_config_of({'a_0_1': nn.meta.unbox(params)}),
                       want)

  def test_proj_hidden_is_a_residual_mlp_after_the_projection(self):
    anchor_h = jnp.ones((2, 5, 32))
    aug_h = jax.random.normal(jax.random.key(1), (2, 5, 16))
    positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
    kw = dict(d_model=32, num_heads=4, recency_bias=True,
              anchor_queries=False)
    linear = B.OursBridge(**kw)
    mlp = B.OursBridge(proj_hidden=24, **kw)
    params = nn.meta.unbox(mlp.init(jax.random.key(0), anchor_h, aug_h,
                                    positions=positions)['params'])
    self.assertEqual(params['mlp_in']['kernel'].shape, (32, 24))
    self.assertEqual(params['mlp_out']['kernel'].shape, (24, 32))
    params['out']['kernel'] = jax.random.normal(
        jax.random.key(2), params['out']['kernel'].shape)
    run = lambda m, p: m.apply({'params': p}, anchor_h, aug_h,
                               positions=positions)
    # With the MLP's output at zero it is the paper's linear bridge...
    off = dict(params, mlp_out={'kernel': jnp.zeros((24, 32))})
    base = {k: v for k, v in off.items() if not k.startswith('mlp_')}
    np.testing.assert_allclose(run(mlp, off), run(linear, base), atol=1e-6)
    # ...and otherwise a different function of m_A's states.
    self.assertGreater(float(jnp.abs(run(mlp, params) -
                                     run(linear, base)).max()), 1e-3)

  def test_no_gradient_reaches_the_augmenting_model(self):
    model, params, tokens = _composed()
    params = _noisy(params)

    def loss(p):
      return model.apply({'params': p}, tokens).mean()
    grads = jax.jit(jax.grad(loss))(params)
    self.assertEqual(float(sum(jnp.abs(g).sum() for g in
                               jax.tree_util.tree_leaves(grads['aug_a']))),
                     0.0)
    self.assertGreater(float(sum(jnp.abs(g).sum() for g in
                                 jax.tree_util.tree_leaves(
                                     grads['composition']))), 0.0)

  def test_no_backward_pass_below_the_lowest_composed_layer(self):
    model, params, tokens = _composed(pairs=((1, 2), (3, 3)))
    params = _noisy(params)
    grads = jax.jit(jax.grad(
        lambda p: model.apply({'params': p}, tokens).mean()))(params)
    norm = lambda t: float(sum(jnp.abs(g).sum()
                               for g in jax.tree_util.tree_leaves(t)))
    for j in (0, 1, 2):
      self.assertEqual(norm(grads['anchor'][f'layer_{j}']), 0.0, j)
    self.assertGreater(norm(grads['anchor']['layer_3']), 0.0)

  def test_pair_into_the_embeddings(self):
    model, params, tokens = _composed(pairs=((1, -1), (3, 3)))
    self.assertEqual(sorted(params['composition']), ['a_1_-1', 'a_3_3'])
    params = _noisy(params)
    # The bridge into the embeddings changes the output (its own gradient)
    # through every block: the backward pass runs through block 0.
    grads = jax.jit(jax.grad(
        lambda p: model.apply({'params': p}, tokens).mean()))(params)
    self.assertGreater(float(jnp.abs(
        grads['anchor']['layer_0']['attn']['query']['kernel']).sum()), 0.0)
    self.assertGreater(float(jnp.abs(
        grads['composition']['a_1_-1']['proj']['kernel']).sum()), 0.0)

  def test_remat_changes_nothing_but_memory(self):
    model, params, tokens = _composed()
    params = _noisy(params)
    remat = C.ComposedLM(
        dataclasses.replace(ANCHOR, remat=True),
        (C.Augmenting('a', dataclasses.replace(AUG, remat=True),
                      ((1, 1), (3, 3))),))

    def loss_and_grad(m):
      return jax.jit(jax.value_and_grad(lambda c: m.apply(
          {'params': {**params, 'composition': c}}, tokens).mean()))(
              params['composition'])
    (l1, g1), (l2, g2) = loss_and_grad(model), loss_and_grad(remat)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        g1, g2)

  def test_several_augmenting_models(self):
    aug2 = T.DecoderConfig(vocab_size=VOCAB, d_model=8, num_layers=2,
                           num_heads=2, d_ff=16, max_len=24)
    model = C.ComposedLM(ANCHOR, (C.Augmenting('a', AUG, ((3, 3),)),
                                  C.Augmenting('b', aug2, ((1, 3), (0, 1)))))
    tokens = jnp.ones((1, 6), jnp.int32)
    params = nn.meta.unbox(
        jax.jit(model.init)(jax.random.key(0), tokens)['params'])
    self.assertEqual(sorted(params), ['anchor', 'aug_a', 'aug_b',
                                      'composition'])
    self.assertEqual(sorted(params['composition']),
                     ['a_3_3', 'b_0_1', 'b_1_3'])
    self.assertEqual(params['composition']['b_1_3']['proj']['kernel'].shape,
                     (8, 32))
    self.assertEqual(model.apply({'params': params}, tokens).shape,
                     (1, 6, VOCAB))


class PackingTest(parameterized.TestCase):
  """Packed rows: no logit of a document depends on another document."""

  @parameterized.named_parameters(
      ('paper_bridges', C.BridgeConfig()),
      ('recency_sliding_learned', OURS_ALL))
  def test_no_logit_in_document_2_depends_on_document_1(self, bridge):
    # m_A with learned positions and the anchor with a sliding window, so
    # positions and windows must restart with each document too.
    aug = dataclasses.replace(AUG, norm='layernorm', position='learned',
                              mlp='gelu', use_bias=True)
    anchor = dataclasses.replace(ANCHOR, sliding_window=4,
                                 sliding_layers=(0, 2))
    model = C.ComposedLM(anchor, (C.Augmenting('a', aug, ((1, 1), (3, 3))),),
                         bridge=bridge)
    doc1 = jax.random.randint(jax.random.key(1), (7,), 3, VOCAB)
    doc2 = jax.random.randint(jax.random.key(2), (9,), 3, VOCAB)
    row = jnp.concatenate([doc1, doc2, jnp.zeros(4, jnp.int32)])[None]
    seg = jnp.array([[1] * 7 + [2] * 9 + [0] * 4])
    pos = jnp.array([list(range(7)) + list(range(9)) + [0] * 4])
    params = _noisy(nn.meta.unbox(model.init(
        jax.random.key(0), row, positions=pos, segment_ids=seg)['params']))
    apply = jax.jit(lambda p, t, **kw: model.apply({'params': p}, t, **kw))
    packed = apply(params, row, positions=pos, segment_ids=seg)
    # Another document 1 (and other padding) changes nothing in document 2.
    other = row.at[0, :7].set((doc1 + 5) % VOCAB).at[0, 16:].set(7)
    again = apply(params, other, positions=pos, segment_ids=seg)
    np.testing.assert_array_equal(packed[0, 7:16], again[0, 7:16])
    self.assertGreater(float(jnp.abs(packed[0, :7] - again[0, :7]).max()),
                       1e-3)
    # Document 2 packed is document 2 alone (positions restart at 0).
    alone = apply(params, doc2[None])
    np.testing.assert_allclose(packed[0, 7:16], alone[0], atol=2e-5)
    # Without segment ids the row is one document: document 2 then does
    # depend on document 1, so the check above can fail.
    unpacked = apply(params, row)
    moved = apply(params, other)
    self.assertGreater(float(jnp.abs(unpacked[0, 7:16] -
                                     moved[0, 7:16]).max()), 1e-3)

  def test_prompt_mask_is_prompt_len_per_document(self):
    model, params, tokens = _composed(prompt_only=True)
    params = _noisy(params)
    plen = jnp.array([3, 5])
    mask = (jnp.arange(tokens.shape[1])[None] < plen[:, None]).astype(
        jnp.int32)
    apply = jax.jit(lambda p, **kw: model.apply({'params': p}, tokens, **kw))
    np.testing.assert_allclose(apply(params, prompt_len=plen),
                               apply(params, prompt_mask=mask), atol=1e-6)


if __name__ == '__main__':
  absltest.main()
