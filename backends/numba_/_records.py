"""The named records the numba kernels read (plain ``namedtuple`` classes: numba types them as
named tuples, and functions taking them are cached on disk, unlike jitclasses).

* :class:`Spec` -- what every task of one ``attend`` call shares: the problem's
  :class:`Geometry`, the Pattern's :class:`Visibility`, ``scale`` and the ``head_map``; the
  :class:`ScoreMods` and :class:`DropoutSpec` records are passed beside it (None when absent);
* :class:`QueryTile` / :class:`KeyTile` -- the per-task geometry, computed once per task by
  :func:`refattn.backends.numba_._tiles.query_tile` / ``key_tile`` and shared by the forward and
  both backward passes.
"""

from __future__ import annotations

from collections import namedtuple

#: sizes: batch, query heads, KV heads, query and key lengths, tile sizes
Geometry = namedtuple("Geometry", ["batch", "hq", "hkv", "sq", "sk", "block_q", "block_k"])

#: the Pattern's tile plan: ``layout`` (B', H', nbq, nbk) int8 codes EMPTY/PARTIAL/FULL (size-1
#: leading dims broadcast); ``pindex``/``pmasks`` the mask of each PARTIAL tile (1-element dummies
#: when ``band_only``, where a PARTIAL tile is tested analytically: key ``j`` visible iff
#: ``lo <= j - (i + offset) <= hi``, unbounded sides being +-2**62)
Visibility = namedtuple("Visibility", ["layout", "pindex", "pmasks", "band_only", "offset", "lo", "hi"])

#: ``softcap`` 0 = none; ``alibi`` 0 none, 1 symmetric ``-slope_h |i + offset - j|``, 2 flash
#: ``+slope_h j``; ``bias`` 4-d float64 broadcast over size-1 dims (a 1x1x1x1 dummy when
#: ``has_bias`` is False)
ScoreMods = namedtuple("ScoreMods", ["softcap", "slopes", "alibi", "bias", "has_bias", "offset"])

#: ``mode`` 0 none, 1 Philox (``_philox``), 2 explicit ``mask`` (4-d bool, broadcast over size-1
#: dims); kept probabilities are multiplied by ``scale`` = 1 / (1 - p). Philox counter of the call's
#: pair ``(i, j)``: ``(row0 + i) * stride + col0 + j``, ``stride`` 0 meaning the call's ``Sk`` (a
#: sub-rectangle passes its global origin and the whole problem's ``Sk``: refattn.subrect)
DropoutSpec = namedtuple("DropoutSpec", ["mode", "p", "scale", "seed", "mask", "row0", "col0", "stride"])

#: what every task of a call shares; the score mods and the dropout travel beside it as separate
#: arguments, None when absent, so that numba compiles only the code a call needs
Spec = namedtuple("Spec", ["geom", "vis", "scale", "head_map"])

#: one query tile of one (batch, query head): rows ``i0 .. i0 + rows - 1``, which start at flat row
#: ``row0`` of the (B*Hq*Sq, D) arrays and read the keys from flat row ``kv0`` of (B*Hkv*Sk, D);
#: ``lb``/``lh`` index the (possibly broadcast) layout
QueryTile = namedtuple("QueryTile", ["b", "h", "ti", "i0", "rows", "row0", "kv0", "lb", "lh"])

#: one key tile of one (batch, KV head): keys ``j0 .. j0 + cols - 1`` from flat row ``kv0 + j0``
KeyTile = namedtuple("KeyTile", ["b", "hkv", "tj", "j0", "cols", "kv0"])
