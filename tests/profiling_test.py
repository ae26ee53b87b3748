"""profiling.dot_inventory: the matmuls a traced step does, and their FLOPs."""

from absl.testing import absltest
import jax
import jax.numpy as jnp

from calm_jax import profiling


class DotInventoryTest(absltest.TestCase):

  def test_forward_backward_and_a_scan_body(self):
    x = jnp.ones((2, 3))
    w = jnp.ones((3, 4))
    u = jnp.ones((4, 4))

    def loss(w, x):
      h = x @ w  # One dot forward; its backward makes dx and dw.

      def body(carry, _):
        return carry @ u, None  # Runs 5 times; no gradient through u.

      h, _ = jax.lax.scan(body, h, None, length=5)
      return jnp.sum(h ** 2)

    inventory = profiling.dot_inventory(
        jax.make_jaxpr(jax.jit(jax.grad(loss, argnums=(0, 1))))(w, x))
    # Forward: x @ w once, carry @ u 5 times; backward: the scan's carry
    # cotangent through u 5 times, then dx and dw of x @ w.
    self.assertEqual(sum(inventory.values()), 1 + 5 + 5 + 2)
    self.assertEqual(
        sorted(inventory.values()), [1, 1, 1, 5, 5])
    forward = [s for s in inventory if s[:2] == ((2, 3), (3, 4))]
    self.assertLen(forward, 1)
    self.assertEqual(profiling.dot_flops(forward[0]), 2 * 2 * 3 * 4)

  def test_flops_agree_with_xla_and_the_rebuilt_dot_matches(self):
    a = jnp.ones((8, 5, 6, 7))  # [batch, t, heads, d] as attention has it.
    b = jnp.ones((8, 9, 6, 7))

    def f(a, b):
      return jnp.einsum('bthd,bshd->bhts', a, b)

    (signature, count), = profiling.dot_inventory(
        jax.make_jaxpr(f)(a, b)).items()
    self.assertEqual(count, 1)
    fn, operands = profiling.dot_call(signature)
    self.assertEqual([o.shape for o in operands], [a.shape, b.shape])
    out = fn(*operands)
    self.assertEqual(out.size, jax.eval_shape(f, a, b).size)
    cost = fn.lower(*operands).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.assertEqual(profiling.dot_flops(signature), 2 * 8 * 6 * 5 * 9 * 7)
    self.assertEqual(profiling.dot_flops(signature), int(cost['flops']))


if __name__ == '__main__':
  absltest.main()
