"""zoo/training/hlo.py reads collectives out of compiled HLO text (the mesh tests rely on it)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from zoo.training import hlo

TEXT = """
  %ag = f32[8,3]{1,0} all-gather(f32[2,3]{1,0} %p), replica_groups=[2,4]<=[8], dimensions={0}
  %ags = (f32[2,3]{1,0}, f32[8,3]{1,0}) all-gather-start(%p), replica_groups={{0,1,2,3},{4,5,6,7}}
  %ar = (f32[4]{0}, f32[2,2]{1,0}) all-reduce(%a, %b), replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_1'}, to_apply=%s, metadata={op_name="jit(f)/psum"}
  %noop = f32[4]{0} all-reduce(%c), replica_groups={{0},{1},{2},{3}}, to_apply=%s
  %cp = (f32[4]{0}, f32[4]{0}, u32[], u32[]) collective-permute-start(%x), source_target_pairs={{0,1}}
  ROOT %a2a = f32[2,8]{1,0} all-to-all(%y), replica_groups={{0,1}}, dimensions={0}
"""


def test_parses_kinds_shapes_groups_and_skips_single_device_groups():
    found = hlo.collectives(TEXT)
    assert [(c.kind, c.shapes, c.group_size) for c in found] == [
            ("all-gather", ((8, 3),), 4),
            ("all-gather", ((8, 3),), 4),
            ("all-reduce", ((4,), (2, 2)), 2),
            ("collective-permute", ((4,),), None),
            ("all-to-all", ((2, 8),), 2),
    ]
    assert found[2].op_name == "jit(f)/psum" and found[2].elements == 8
    assert str(found[2]) == "all-reduce f32[4], f32[2,2] (jit(f)/psum)"
    assert len(hlo.collectives(TEXT, include_trivial=True)) == 6
    assert hlo.counts(found) == {"all-gather": 2, "all-to-all": 1, "all-reduce": 1,
                                 "reduce-scatter": 0, "collective-permute": 1}


def test_a_real_replicated_matmul_gather_is_found_and_matched_to_kernel_arrays():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    x = jnp.ones((8, 16, 4))
    # Replicating a batch-split array forces an all-gather of the whole batch.
    text = jax.jit(lambda a: a * 2, in_shardings=NamedSharding(mesh, P("data")),
                   out_shardings=NamedSharding(mesh, P())).lower(x).compile().as_text()
    gathers = [c for c in hlo.collectives(text) if c.kind == "all-gather"]
    assert gathers and gathers[0].shapes == ((8, 16, 4),)
    arrays = [(8, 16, 4)]
    assert hlo.gathers_kernel_array(gathers[0], arrays, param_shapes=[], num_devices=8)
    # The same shape as a parameter: an FSDP weight gather, not a kernel operand.
    assert not hlo.gathers_kernel_array(gathers[0], arrays, param_shapes=[(1, 16, 8, 4)],
                                        num_devices=8)
