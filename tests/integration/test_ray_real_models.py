"""Ray on the real models: local-Ray scoring equals single-process scoring exactly."""

import pytest

from nsds import cluster
from nsds.compute import Compute
from nsds.scorers.nsds import NsdsParams, score
from nsds.weights import open_source

import needs

pytestmark = pytest.mark.integration
needs.module("ray")


@pytest.mark.parametrize("asset", ["smollm2_gguf", "gemma3_gguf"])
def test_ray_scores_equal_single_process_scores(local_ray, asset, request):
    path = str(request.getfixturevalue(asset))
    expected = score(open_source(path))
    got = cluster.score(path, None, NsdsParams(), Compute(), workers=2)
    assert got.layers == expected.layers and got.ranking == expected.ranking
    assert got.unembedding_rank == expected.unembedding_rank
