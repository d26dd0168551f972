"""How `fwdata.build.sfm._solve` reads its focal hypotheses, on constructed focal maps.

Each keyframe map built with the focal held at f adjusts to a free focal g(f) with a reprojection
error r(f). The real g comes from COLMAP (tests/build/test_build_realistic.py and
test_build_wrong_basins.py run it); here g is a table, so the chain logic is checked exactly:
fixed points and cycles are basins, chains share the maps they both reach, and two basins that
reproject equally well make the clip ambiguous.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

import fwdata.build.sfm as sfm

W = 504  # the clip width: the field-of-view ladder's starts are 328.4 (75 deg) and 940.5 (30 deg) px


def _install(monkeypatch, table: dict[float, tuple[float, float]], f0: float) -> list[float]:
    """Replace the mapping by `table` (built-with focal -> (adjusted focal, reprojection px)); returns the
    list that records every focal a map was built with."""
    built: list[float] = []

    def attempt(clip, keyframes, f, extra, refine):
        key = min(table, key=lambda x: abs(x - f))
        assert abs(key / f - 1) < 0.01, f"no map for focal {f}"
        built.append(f)
        final, reproj = table[key]
        return sfm._Attempt(f_fixed=f, f_final=final, extra_final=[], rec=None, mapped=np.ones(3, bool),
                            num_models=1, reproj=reproj, registered=3)

    monkeypatch.setattr(sfm, "_attempt", attempt)
    monkeypatch.setattr(sfm, "_view_graph_focal", lambda clip: None)
    monkeypatch.setattr(sfm, "_focal_from_db", lambda clip: f0)
    return built


def _clip():
    return types.SimpleNamespace(opts=sfm.SfmOptions(), W=W)


# The 81-frame forward render (realistic, seed 1's forward clip, truth 443 px): the adjusted focal
# alternates between ~448 and ~362 (forward motion constrains it weakly); the 448 side reprojects best.
FORWARD_CYCLE = {604.8: (482.0, .1870), 482.0: (449.2, .1817), 449.2: (361.7, .2198), 361.7: (448.0, .1815),
                 328.4: (447.8, .1833), 940.5: (614.3, .2624), 614.3: (462.9, .1873), 462.9: (362.9, .2193)}


def test_a_two_cycle_is_one_basin_and_chains_share_maps(monkeypatch):
    built = _install(monkeypatch, FORWARD_CYCLE, f0=604.8)
    sol = sfm._solve(_clip(), [0, 1, 2], refine=True)
    assert sol.best.f_final == 448.0 and sol.starts == 3
    assert sol.hypotheses == [448.0, 448.0, 448.0] and sol.spread == 0.0
    # the 75-degree chain reaches 447.8 -> the 449.2 map already built; the 30-degree chain adjusts to
    # 614.3, 1.6 % from the first chain's 604.8 map (within FOCAL_REVISIT), and follows it into the same
    # cycle: its 614.3 and 462.9 maps are never built
    assert [round(f, 1) for f in built] == [604.8, 482.0, 449.2, 361.7, 328.4, 940.5]
    chain = sfm._settle(_clip(), [0, 1, 2], 940.5, [], max_rounds=4)  # alone it builds them
    assert [round(a.f_fixed) for a in chain.steps] == [940, 614, 463, 363]


def test_a_focal_reuses_the_nearest_map_within_the_settling_resolution(monkeypatch):
    # maps at 500 and 520 px are both within 3 % of 510: the chain takes the 520 one (1.9 % against 2.0 %)
    table = {600.0: (510.0, .20), 500.0: (700.0, .30), 520.0: (521.0, .19)}
    built = _install(monkeypatch, table, f0=600.0)
    visited = [sfm._attempt(None, [0, 1, 2], f, None, True) for f in (500.0, 520.0)]
    chain = sfm._settle(_clip(), [0, 1, 2], 600.0, visited)
    assert chain.settled and chain.end.f_fixed == 520.0 and built == [500.0, 520.0, 600.0]
    # 2.9 % off a built map is that map; 3.1 % off is a new one
    assert sfm.FOCAL_REVISIT == sfm.FOCAL_SETTLED == 0.03
    for f, reused in ((520.0 * 1.029, True), (520.0 * 1.031, False)):
        visited = [sfm._attempt(None, [0, 1, 2], 520.0, None, True)]
        table[round(f, 3)] = (f, .19)
        c = sfm._settle(_clip(), [0, 1, 2], f, visited)
        assert (c.steps[0].f_fixed == 520.0) == reused


def test_a_start_next_to_a_built_map_is_no_independent_start(monkeypatch):
    # the 30-degree start splits into two models (no complete chain), so the ladder goes on: its 60-degree
    # start (436.5 px at W=504) is 1.9 % from the 445 map the first chain built (it would only reuse it)
    # and is skipped; the 100-degree start (211.5 px) is mapped instead
    table = {604.8: (445.0, .20), 445.0: (446.0, .18), 328.4: (447.0, .20), 940.5: (900.0, .20),
             211.5: (300.0, .19), 300.0: (301.0, .185)}
    built = _install(monkeypatch, table, f0=604.8)
    stub = sfm._attempt

    def attempt(clip, kf, f, extra, refine):
        assert abs(f / 436.5 - 1) > 0.005, "a map was built at the skipped 60-degree start"
        a = stub(clip, kf, f, extra, refine)
        if round(f, 1) == 940.5:
            a.num_models = 2
        return a

    monkeypatch.setattr(sfm, "_attempt", attempt)
    sol = sfm._solve(_clip(), [0, 1, 2], refine=True)
    assert [round(f, 1) for f in built] == [604.8, 445.0, 328.4, 940.5, 211.5, 300.0] and sol.starts == 3
    assert sorted(sol.hypotheses) == [301.0, 446.0, 446.0]  # the clip's two basins: ambiguous
    assert sol.spread > sfm.SfmOptions().max_focal_spread


def test_a_chain_alone_runs_out_of_rounds_unsettled(monkeypatch):
    _install(monkeypatch, FORWARD_CYCLE, f0=940.5)
    chain = sfm._settle(_clip(), [0, 1, 2], 940.5, [], max_rounds=4)
    assert not chain.settled and [round(a.f_fixed) for a in chain.steps] == [940, 614, 463, 363]
    assert chain.end.f_final == 448.0  # its best-reprojecting map (built at 362.9)


def test_a_jump_to_a_far_worse_map_does_not_stand_for_the_chain(monkeypatch):
    # the realistic 33-frame forward render (288x512 source): the map built at 449 px adjusts to 880 px
    # with 3x the reprojection error, and mapping at 880 fails; the 449 maps are the answer
    table = {604.8: (449.0, .2328), 449.0: (880.5, .7051), 328.4: (448.7, .2343), 535.7: (938.3, .7047)}
    _install(monkeypatch, table, f0=604.8)
    real = sfm._attempt
    monkeypatch.setattr(sfm, "_attempt", lambda clip, kf, f, extra, refine: (
        None if f > 850 else real(clip, kf, f, extra, refine)))
    monkeypatch.setattr(sfm, "_view_graph_focal", lambda clip: 535.7)
    sol = sfm._solve(_clip(), [0, 1, 2], refine=True)
    assert sol.best.f_final == 449.0 and sorted(sol.hypotheses) == [448.7, 449.0]
    assert sol.spread < sfm.SfmOptions().max_focal_spread


def test_two_equally_good_basins_are_ambiguous(monkeypatch):
    # fixed points at 450 and 520 px (each maps to itself), equally good: the data do not pick one
    table = {604.8: (520.0, .20), 520.0: (521.0, .180), 328.4: (450.0, .20), 450.0: (451.0, .181),
             940.5: (521.5, .19)}
    _install(monkeypatch, table, f0=604.8)
    sol = sfm._solve(_clip(), [0, 1, 2], refine=True)
    assert sorted(round(h) for h in sol.hypotheses) == [451, 521, 521]
    assert sol.spread > sfm.SfmOptions().max_focal_spread


def test_a_clearly_worse_basin_is_not_a_hypothesis(monkeypatch):
    table = {604.8: (520.0, .30), 520.0: (521.0, .300), 328.4: (450.0, .20), 450.0: (451.0, .181),
             940.5: (452.0, .19), 452.0: (451.5, .182)}
    _install(monkeypatch, table, f0=604.8)
    sol = sfm._solve(_clip(), [0, 1, 2], refine=True)
    # 940.5 -> 452 reuses the 450 map (within 1 %): that chain ends in the same basin; 521 is 66 % worse
    assert sol.best.f_final == 451.0 and sol.hypotheses == [451.0, 451.0]


def test_a_travelling_chain_that_reprojects_better_counts_against_the_basin(monkeypatch):
    # the 604.8 chain settles at 450; the 328.4 chain keeps moving (each map a little further) and
    # already reprojects better: the tries did not find where it ends, so the clip is not decided
    table = {604.8: (450.0, .20), 450.0: (451.0, .200), 328.4: (380.0, .19), 380.0: (420.0, .185),
             420.0: (470.0, .183), 470.0: (510.0, .182), 940.5: (900.0, .5), 900.0: (860.0, .5),
             860.0: (820.0, .5), 820.0: (780.0, .5)}
    _install(monkeypatch, table, f0=604.8)
    sol = sfm._solve(_clip(), [0, 1, 2], refine=True)
    assert sol.best.f_final == 451.0 and 510.0 in sol.hypotheses
    assert sol.spread > sfm.SfmOptions().max_focal_spread
