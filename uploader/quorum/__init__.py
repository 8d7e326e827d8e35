"""A fleet that trusts no single builder: builders attest, a publisher signs.

Builders run the usual `push`/`run` in attest mode: each NAR they built
themselves goes to a staging area of the bucket with an attestation signed by
the builder's own key (``attestation``, ``layout``, ``attest``).  The
publisher (``publish``) signs a narinfo with the cache key only when enough
distinct builders agree on a path (``tally``), references first, after
checking the staged NAR; it reports disputes and never changes what it has
published.  The format is in docs/quorum-format.md, the operations in
docs/fleet.md.  This package uses the core (narinfo, signing, targets,
engine); nothing in the core uses it.
"""

from uploader.quorum.attest import Attester
from uploader.quorum.attestation import VERSION, Attestation, Claim, StagedNar
from uploader.quorum.bucket import Bucket, open_bucket
from uploader.quorum.layout import check_builder_name
from uploader.quorum.publish import PassResult, Publisher
from uploader.quorum.status import quorum_status
from uploader.quorum.tally import CONFLICT, READY, WAITING, Verdict, judge

__all__ = [
    "CONFLICT",
    "READY",
    "VERSION",
    "WAITING",
    "Attestation",
    "Attester",
    "Bucket",
    "Claim",
    "PassResult",
    "Publisher",
    "StagedNar",
    "Verdict",
    "check_builder_name",
    "judge",
    "open_bucket",
    "quorum_status",
]
