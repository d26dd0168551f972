"""Depth and cameras that disagree are refused, not written (issue 12: a rotation-dominant render
settled in a wrong focal basin, -14 %, and reprojected well; only the depth prior disagreed)."""

from __future__ import annotations

import numpy as np
import pytest

from fwdata.build.align import AlignError, AlignOptions, AlignResult, check_agreement


def _result(absrel: float) -> AlignResult:
    T = 2
    return AlignResult(depth=np.ones((T, 4, 4), np.float32), valid=np.ones((T, 4, 4), bool),
                       w2c=np.tile(np.eye(4), (T, 1, 1)), points=np.zeros((1, 3)), scale="normalized",
                       scale_source="sfm", params=np.ones((T, 2)), refined=np.zeros(T, bool), absrel=absrel,
                       absrel_per_frame=np.full(T, absrel), frames_with_points=T)


def test_disagreeing_depth_and_cameras_are_refused():
    with pytest.raises(AlignError, match=r"disagree.*40 %.*limit 25 %"):
        check_agreement(_result(0.40), AlignOptions())


@pytest.mark.parametrize("absrel", [0.02, 0.25, float("nan")])
def test_agreeing_or_unmeasured_clips_pass(absrel):
    check_agreement(_result(absrel), AlignOptions())


def test_the_limit_is_an_option():
    check_agreement(_result(0.40), AlignOptions(max_absrel=0.0))  # 0 = off
    with pytest.raises(AlignError):
        check_agreement(_result(0.12), AlignOptions(max_absrel=0.1))
