"""The plan interface (`base.Plan`) and its kinds, one module each: `copy` (a planned head outputs the first token's
value) and `streaming` (the first s tokens and a window of w keys). They know no statistics: plans come from
`sink_eval.policies`, or from anyone."""

from sink_eval.patches import copy  # noqa: F401  (registers the built-in kinds in `base.PLAN_KINDS`)
from sink_eval.patches.streaming import plan  # noqa: F401
