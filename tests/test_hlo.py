"""Collective bytes read from HLO text: kinds, sizes, loop trip counts, async pairs, unknown loops."""

from __future__ import annotations

import pytest

from realm_jax.distributed.hlo import collective_bytes, collectives
from realm_jax.errors import RealmError

HLO = """
HloModule step

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(f32[] %a, f32[] %b)
}

%layer (p: (s32[], f32[2,64])) -> (s32[], f32[2,64]) {
  %ar = f32[2,64]{1,0} all-reduce(f32[2,64]{1,0} %x), channel_id=1, replica_groups={{0,1}}, to_apply=%add
  %ags = (bf16[2,32]{1,0}, bf16[2,64]{1,0}) all-gather-start(bf16[2,32]{1,0} %y), dimensions={1}
  %agd = bf16[2,64]{1,0} all-gather-done((bf16[2,32]{1,0}, bf16[2,64]{1,0}) %ags)
  ROOT %t = (s32[], f32[2,64]) tuple(%i, %ar)
}

%cond (p: (s32[], f32[2,64])) -> pred[] {
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

%decode (p: (s32[], f32[2,64])) -> (s32[], f32[2,64]) {
  %w = (s32[], f32[2,64]) while((s32[], f32[2,64]) %p), condition=%cond, body=%layer, backend_config={"known_trip_count":{"n":"30"}}
  %cp = s8[16]{0} collective-permute(s8[16]{0} %z), source_target_pairs={{0,1},{1,0}}
  ROOT %r = (s32[], f32[2,64]) tuple(%i, %ar)
}

ENTRY %main (x: f32[2,64]) -> f32[2,64] {
  %loop = (s32[], f32[2,64]) while((s32[], f32[2,64]) %init), condition=%cond, body=%decode
  ROOT %out = f32[2,1000]{1,0} all-gather(f32[2,500]{1,0} %logits), dimensions={1}
}
"""


def test_counts_kinds_sizes_and_trip_counts():
    per_step = collective_bytes(HLO, unknown_trips=1)
    # 30 layers x (an f32 [2, 64] all-reduce + a bf16 [2, 64] gathered result), the permute, the logits
    assert per_step == {"all-reduce": 30 * 2 * 64 * 4, "all-gather": 30 * 2 * 64 * 2 + 2 * 1000 * 4,
                        "collective-permute": 16}
    runs = {(c.kind, c.computation): c.executions for c in collectives(HLO, unknown_trips=5)}
    assert runs[("all-reduce", "layer")] == 150 and runs[("collective-permute", "decode")] == 5
    assert runs[("all-gather", "main")] == 1


def test_a_loop_of_unknown_trips_is_an_error_unless_told():
    with pytest.raises(RealmError, match="without a known trip count"):
        collective_bytes(HLO)


def test_not_hlo():
    with pytest.raises(RealmError, match="no ENTRY computation"):
        collective_bytes("hello")
