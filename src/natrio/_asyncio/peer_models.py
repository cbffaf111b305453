"""The bench's task input and output as pydantic models, for the peers (FastStream, taskiq)
whose typed handlers decode with pydantic. Imported only inside the peers' processes."""

import pydantic


class Job(pydantic.BaseModel):
    """The task input (``natrio._bench.workload.Job``'s fields)."""

    n: int
    name: str
    size: int


class JobDone(pydantic.BaseModel):
    """The task output (``natrio._bench.workload.JobDone``'s fields)."""

    n: int
    ok: bool
