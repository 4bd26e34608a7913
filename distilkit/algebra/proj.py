"""Projections of student features to the teacher's width: ``dk.proj.linear/relu/tanh(d_student, d_teacher)``."""

from ._proj import Projection as Projection
from ._proj import linear as linear
from ._proj import relu as relu
from ._proj import tanh as tanh
