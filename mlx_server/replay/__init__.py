"""Request traces: record them (`mlx-server --record-trace FILE`) and re-send them
(`python -m mlx_server.replay FILE --url URL`) to reproduce a problem, compare two versions or
load-test a machine."""

from .record import TraceRecorder as TraceRecorder
from .trace import Malformed as Malformed
from .trace import TraceEntry as TraceEntry
from .trace import arrival_schedule as arrival_schedule
from .trace import read_trace as read_trace
