"""The bucket's lifecycle: auditing what a cache holds (`verify`), and
repairing it from the local store.

It depends on the core (narinfo, signing, targets, engine), never the other
way.  ``listing`` walks the bucket, ``verify`` checks it (``deep`` downloads
the NARs), ``repair`` uploads again what is damaged.
"""

from uploader.lifecycle.repair import RepairResult, repair
from uploader.lifecycle.verify import KINDS, Problem, Report, VerifyOptions, verify

__all__ = ["KINDS", "Problem", "RepairResult", "Report", "VerifyOptions", "repair", "verify"]
