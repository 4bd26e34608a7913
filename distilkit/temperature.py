"""Adaptive temperatures (``dk.temperature.flsw``, ``dk.temperature.cwsm``): one temperature per row, computed from
the student's and teacher's logits of the kept rows, clamped to stay positive. Give them as ``temperature=`` in
``.on(...)``; ``temp(student_logits, teacher_logits, mask=None)`` returns a detached tensor of the leading shape.
"""

from .schedules._temperature import MIN_TEMPERATURE as MIN_TEMPERATURE
from .schedules._temperature import AdaptiveTemperature as AdaptiveTemperature
from .schedules._temperature import cwsm as cwsm
from .schedules._temperature import flsw as flsw

__all__ = ["MIN_TEMPERATURE", "AdaptiveTemperature", "cwsm", "flsw"]
