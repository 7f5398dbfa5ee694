"""Source URIs: the one way a FineTuneJob names where a model, a dataset or an output lives.

The same regular expressions validate a URI in the pydantic models and, as CEL ``matches``
rules, in the generated CRD, so the apiserver and the trainer accept exactly the same strings.
They are kept to the subset that Python's ``re`` and Go's RE2 read alike: no look-arounds,
no back-references, explicit ASCII classes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

Scheme = Literal["hf", "https", "http", "pvc", "oci", "s3", "configmap", "file"]

_DNS_LABEL: Final = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_DNS_SUBDOMAIN: Final = rf"{_DNS_LABEL}(\.{_DNS_LABEL})*"
_PATH: Final = r"[^\s?#]*"
#: A segment of a path inside a claim: anything but ``..`` (RE2 has no look-ahead, hence the spelling).
_SEGMENT: Final = r"([^\s?#/.][^\s?#/]*|\.[^\s?#/.][^\s?#/]*|\.\.[^\s?#/]+|\.)"
#: A segment of an S3 key: anything but ``.`` and ``..``.
_KEY_SEGMENT: Final = r"([^\s?#/.][^\s?#/]*|\.[^\s?#/.][^\s?#/]*|\.\.[^\s?#/]+)"

#: One pattern per scheme; each matches the whole URI.
SCHEME_PATTERNS: Final[dict[Scheme, str]] = {
    # hf://org/name[@revision] or hf://name[@revision]
    "hf": r"hf://[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?(@[A-Za-z0-9._/-]+)?",
    "https": r"https://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[^\s]*)?",
    "http": r"http://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[^\s]*)?",
    # pvc://claim[/path]: the claim is a PersistentVolumeClaim in the job's namespace; no '..' in the
    # path, which would leave the claim.
    "pvc": rf"pvc://{_DNS_SUBDOMAIN}(/{_SEGMENT}?)*",
    # oci://registry[:port]/repository[:tag|@digest]
    "oci": r"oci://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[a-z0-9._-]+)+(:[A-Za-z0-9_][A-Za-z0-9._-]{0,127})?"
    r"(@sha256:[a-f0-9]{64})?",
    # s3://bucket/key (one object) or s3://bucket/prefix/ (every object under the prefix: a folder);
    # no empty, '.' or '..' segment, which would name a file outside the folder it is fetched into.
    "s3": rf"s3://[a-z0-9][a-z0-9.-]{{1,61}}[a-z0-9](/({_KEY_SEGMENT}/)*{_KEY_SEGMENT}?)?",
    # configmap://name/key: small data only (a ConfigMap holds at most 1 MiB).
    "configmap": rf"configmap://{_DNS_SUBDOMAIN}/[-._a-zA-Z0-9]+",
    # file:///absolute/path: only for `kubetune train` on a workstation, never in a cluster.
    "file": r"file:///[^\s]*",
}

#: Human-readable form of each scheme, for error messages and field descriptions.
SCHEME_FORMS: Final[dict[Scheme, str]] = {
    "hf": "hf://org/name[@revision]",
    "https": "https://host/path",
    "http": "http://host/path",
    "pvc": "pvc://claim/path",
    "oci": "oci://registry/repository:tag",
    "s3": "s3://bucket/key",
    "configmap": "configmap://name/key",
    "file": "file:///absolute/path",
}

#: s3:// outputs are not supported yet: refused at admission with the forms that work, not inside a
#: pod after the nodes were paid for.
_NOT_YET: Final = frozenset({"s3"})
MODEL_SCHEMES: Final[tuple[Scheme, ...]] = ("hf", "https", "http", "pvc", "s3", "oci")
DATASET_SCHEMES: Final[tuple[Scheme, ...]] = ("hf", "https", "http", "pvc", "s3", "oci", "configmap")
OUTPUT_SCHEMES: Final[tuple[Scheme, ...]] = ("pvc", "oci")
#: An MLflow tracking server (training.tracking.mlflowTrackingUri).
TRACKING_SCHEMES: Final[tuple[Scheme, ...]] = ("https", "http")


@dataclass(frozen=True, slots=True)
class SecretKey:
    """A key of the Secret a source's ``secretRef`` names (the trainer reads it as a file)."""

    name: str
    required: bool
    meaning: str


#: The keys a source's secretRef Secret holds, per scheme; schemes not named here take no Secret.
SOURCE_SECRET_KEYS: Final[dict[Scheme, tuple[SecretKey, ...]]] = {
    "hf": (SecretKey("token", True, "a Hugging Face access token; `$HF_TOKEN` of the pod without a secretRef"),),
    "oci": (
        SecretKey(
            ".dockerconfigjson",
            True,
            "a `kubernetes.io/dockerconfigjson` Secret with an entry for the registry "
            "(`kubectl create secret docker-registry`); an anonymous pull without a secretRef",
        ),
    ),
    "s3": (
        SecretKey(
            "AWS_ACCESS_KEY_ID",
            True,
            "the access key; without a secretRef, boto3's default chain (IRSA, workload identity)",
        ),
        SecretKey("AWS_SECRET_ACCESS_KEY", True, "the secret key"),
        SecretKey("AWS_SESSION_TOKEN", False, "the session token of temporary credentials"),
        SecretKey("AWS_REGION", False, "the bucket's region (`AWS_DEFAULT_REGION` is read too)"),
        SecretKey("AWS_DEFAULT_REGION", False, "the bucket's region when `AWS_REGION` is not set"),
        SecretKey(
            "AWS_ENDPOINT_URL",
            False,
            "an S3-compatible store (MinIO, …), e.g. `https://minio.example.org:9000`; checked like an http(s) source: "
            "a private address only in the networks the operator allows (`--allow-private-network CIDR`)",
        ),
    ),
}


def pattern_for(schemes: tuple[Scheme, ...]) -> str:
    """An anchored pattern accepting any URI of the given schemes."""
    return "^(" + "|".join(f"({SCHEME_PATTERNS[s]})" for s in schemes) + ")$"


def forms(schemes: tuple[Scheme, ...]) -> str:
    """The accepted forms as one phrase: ``hf://org/name[@revision], pvc://claim/path or …``."""
    names = [SCHEME_FORMS[s] for s in schemes]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


@dataclass(frozen=True, slots=True)
class SourceURI:
    """A parsed source or destination URI."""

    scheme: Scheme
    #: Everything after ``scheme://``.
    location: str

    @property
    def authority(self) -> str:
        """The part before the first slash: repository owner, claim, bucket, registry or ConfigMap."""
        return self.location.split("/", 1)[0]

    @property
    def path(self) -> str:
        """The part after the first slash, empty when there is none."""
        parts = self.location.split("/", 1)
        return parts[1] if len(parts) == 2 else ""

    def __str__(self) -> str:
        return f"{self.scheme}://{self.location}"


def s3_key_segments(key: str) -> list[str]:
    """The segments of an S3 key or prefix (``a/b/`` is ``a``, ``b``); none for the whole bucket."""
    return key.removesuffix("/").split("/") if key else []


def parse_uri(uri: str, schemes: tuple[Scheme, ...]) -> SourceURI:
    """Parse ``uri``, accepting only ``schemes``; raise ``ValueError`` naming the accepted forms."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise ValueError(f"{uri!r} is not a URI; use {forms(schemes)}")
    if scheme not in schemes:
        later = " (not supported here yet)" if scheme in _NOT_YET else ""
        raise ValueError(f"unsupported scheme {scheme + '://'!r}{later} in {uri!r}; use {forms(schemes)}")
    if re.fullmatch(SCHEME_PATTERNS[scheme], uri) is None:
        if scheme == "pvc" and ".." in rest.split("/")[1:]:
            raise ValueError(
                f"malformed pvc:// URI {uri!r}: '..' would leave claim {rest.split('/')[0]}; "
                "name a path inside the claim"
            )
        if scheme == "s3" and any(s in ("", ".", "..") for s in s3_key_segments(rest.partition("/")[2])):
            raise ValueError(
                f"malformed s3:// URI {uri!r}: an empty, '.' or '..' segment in the key would name a file "
                "outside the folder it is fetched into; use s3://bucket/key for an object or "
                "s3://bucket/prefix/ for every object under a prefix"
            )
        raise ValueError(f"malformed {scheme}:// URI {uri!r}; expected {SCHEME_FORMS[scheme]}")
    return SourceURI(scheme=scheme, location=rest)
