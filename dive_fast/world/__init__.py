"""The embedded world: deterministic images, captions and labelled tasks (no downloads)."""
from .render import BACKGROUNDS, COLOURS, COUNTS, POSITIONS, SHAPES, SIZES, STYLES, render
from .tasks import TASKS, Task, caption_pair, sample_scene, task_image, task_scene

__all__ = ["BACKGROUNDS", "COLOURS", "COUNTS", "POSITIONS", "SHAPES", "SIZES", "STYLES", "TASKS",
           "Task", "caption_pair", "render", "sample_scene", "task_image", "task_scene"]
