"""Hardware co-design planner: what a model costs on a cluster, and which parallel layout to use.

One module per job: `models` (model shapes, dense GQA too), `catalog` (hardware data), `network`
(topologies, collective costs), `layout` (a layout and its rules), `memory`, `steptime`, `decode`,
`planner` (search and explanation), `render` (tables, JSON, plots), `calibrate` (this machine), `cli`.
"""

from .catalog import CATALOG, Hardware, get_hardware, load_catalog
from .layout import Layout, TrainSettings
from .models import DenseGQA, ModelShape, load_model
from .planner import Plan, explain, plan

__all__ = ["CATALOG", "DenseGQA", "Hardware", "Layout", "ModelShape", "Plan", "TrainSettings", "explain",
           "get_hardware", "load_catalog", "load_model", "plan"]
