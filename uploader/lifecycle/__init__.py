"""The bucket's lifecycle: auditing what a cache holds (`verify`),
repairing it from the local store, and keeping it small (roots, pins, `gc`).

It depends on the core (narinfo, signing, targets, engine), never the other
way.  ``listing`` walks the bucket, ``verify`` checks it (``deep`` downloads
the NARs, ``upstream`` asks other caches and checks signatures) into a
``report``, ``repair`` uploads again what is damaged.  ``layout`` names the
lifecycle objects; ``roots`` and ``pins`` say what is live, ``marks`` and
``gclock`` are gc's run records and lock, ``survey`` and ``plan`` what gc
reads and decides, ``gc`` runs it, and ``protect`` is the uploaders' side.
"""

from uploader.lifecycle.gc import GcResult, collect
from uploader.lifecycle.gclock import LockHeld
from uploader.lifecycle.layout import LayoutError
from uploader.lifecycle.pins import PinRefused, add_pin
from uploader.lifecycle.protect import Protection
from uploader.lifecycle.repair import RepairResult, repair
from uploader.lifecycle.report import KINDS, Problem, Report
from uploader.lifecycle.roots import list_pins, remove_pin
from uploader.lifecycle.survey import Policy
from uploader.lifecycle.verify import VerifyOptions, verify

__all__ = [
    "KINDS",
    "GcResult",
    "LayoutError",
    "LockHeld",
    "PinRefused",
    "Policy",
    "Problem",
    "Protection",
    "RepairResult",
    "Report",
    "VerifyOptions",
    "add_pin",
    "collect",
    "list_pins",
    "remove_pin",
    "repair",
    "verify",
]
