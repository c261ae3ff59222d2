"""Whose job is it: the one check every read, stream and cancel of a job passes, over REST and gRPC alike.

A job belongs to the API key that submitted it (`Job.owner`, its key id); `Principal.sees` (service/auth.py) says
who else may touch it (admin keys; everyone when authentication is off). Another key's job raises the very
`JobNotFound` an unknown id raises, with the id the caller sent, so status and body are the same (404 /
NOT_FOUND): a leaked job id confirms nothing and opens nothing.
"""

from __future__ import annotations

from service.auth import Principal
from service.queue import Job, JobNotFound, JobQueue


async def visible_job(queue: JobQueue, job_id: str, principal: Principal) -> Job:
    """The job `job_id` if `principal` may see it. Raises JobNotFound when it is unknown, expired or another key's."""
    job = await queue.get(job_id)
    if job is None or not principal.sees(job.owner):
        raise JobNotFound(job_id)
    return job
