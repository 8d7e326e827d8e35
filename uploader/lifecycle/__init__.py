"""The bucket's lifecycle: auditing what a cache holds (`verify`), and
repairing it from the local store.

It depends on the core (narinfo, signing, targets, engine), never the other
way.  ``listing`` walks the bucket, ``verify`` checks it (``deep`` downloads
the NARs, ``upstream`` asks other caches and checks signatures) into a
``report``, ``repair`` uploads again what is damaged.
"""

from uploader.lifecycle.repair import RepairResult, repair
from uploader.lifecycle.report import KINDS, Problem, Report
from uploader.lifecycle.verify import VerifyOptions, verify

__all__ = ["KINDS", "Problem", "RepairResult", "Report", "VerifyOptions", "repair", "verify"]
