"""The one module through which the operator talks to the Kubernetes API.

Server-side apply with the operator's field manager, create-once for immutable children,
deletes that tolerate absence, status writes through the status subresource, Events, and
lists by label. Everything else in the operator works on plain dicts.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Final

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import NotFoundError, ResourceNotFoundError

from kubetune_api.objects import Obj, format_time
from kubetune_api.resource import API_VERSION, KIND
from kubetune_operator import names

log = logging.getLogger("kubetune.kube")

FTJ_API: Final = (API_VERSION, KIND)


class Kube:
    """A thin, logged wrapper over the dynamic client."""

    def __init__(self, api: client.ApiClient | None = None) -> None:
        if api is None:
            try:
                config.load_incluster_config()
                api = client.ApiClient()
            except config.ConfigException:
                api = config.new_client_from_config()
        self.api = api
        self.dynamic = DynamicClient(api)
        self._lock = threading.Lock()
        self._resources: dict[tuple[str, str], Any] = {}

    def resource(self, api_version: str, kind: str) -> Any:
        """The discovered resource; raises ResourceNotFoundError when the API (a CRD) is not installed."""
        key = (api_version, kind)
        with self._lock:
            if key not in self._resources:
                self._resources[key] = self.dynamic.resources.get(api_version=api_version, kind=kind)
            return self._resources[key]

    def installed(self, api_version: str, kind: str) -> bool:
        try:
            self.resource(api_version, kind)
        except ResourceNotFoundError:
            with self._lock:
                self.dynamic.resources.invalidate_cache()  # it may be installed later
            return False
        return True

    # ----------------------------------------------------------------------------- reads

    def list(
        self,
        api_version: str,
        kind: str,
        *,
        namespace: str | None = None,
        labels: str | None = None,
        fields: str | None = None,
    ) -> list[Obj]:
        found = self.resource(api_version, kind).get(namespace=namespace, label_selector=labels, field_selector=fields)
        return [item.to_dict() for item in found.items]

    # ---------------------------------------------------------------------------- writes

    def apply(self, manifest: Obj) -> Obj:
        """Server-side apply with the operator's field manager (conflicts forced: the operator owns these)."""
        meta = manifest["metadata"]
        resource = self.resource(manifest["apiVersion"], manifest["kind"])
        applied = resource.server_side_apply(
            body=manifest,
            name=meta["name"],
            namespace=meta.get("namespace"),
            field_manager=names.FIELD_MANAGER,
            force_conflicts=True,
        )
        log.debug("applied %s %s", manifest["kind"], meta["name"])
        result: Obj = applied.to_dict()
        return result

    def create(self, manifest: Obj) -> bool:
        """Create unless it exists; True when this call created it."""
        meta = manifest["metadata"]
        resource = self.resource(manifest["apiVersion"], manifest["kind"])
        try:
            resource.create(body=manifest, namespace=meta.get("namespace"), field_manager=names.FIELD_MANAGER)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        log.info("created %s %s", manifest["kind"], meta["name"])
        return True

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> None:
        try:
            self.resource(api_version, kind).delete(
                name=name, namespace=namespace, body={"propagationPolicy": "Background"}
            )
            log.info("deleted %s %s", kind, name)
        except NotFoundError:
            pass

    def merge_patch(self, obj: Obj, patch: Obj) -> None:
        meta = obj["metadata"]
        self.resource(obj["apiVersion"], obj["kind"]).patch(
            body=patch,
            name=meta["name"],
            namespace=meta.get("namespace"),
            content_type="application/merge-patch+json",
        )

    def write_status(self, namespace: str, name: str, status: Obj, *, kind: str = KIND) -> None:
        """Merge-patch a FineTuneJob's (or ModelServer's) status through its subresource (an RFC 7386 merge patch)."""
        resource = self.resource(API_VERSION, kind)
        resource.status.patch(
            body={"status": status}, name=name, namespace=namespace, content_type="application/merge-patch+json"
        )

    def event(self, involved: Obj, event_type: str, reason: str, message: str) -> None:
        """A core/v1 Event on the FineTuneJob, as ``kubectl describe`` shows them."""
        meta = involved["metadata"]
        now = format_time()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved["apiVersion"],
                "kind": involved["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": event_type,
            "reason": reason,
            "message": message[:1024],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "source": {"component": "kubetune-operator"},
            "reportingComponent": "kubetune-operator",
        }
        try:
            self.resource("v1", "Event").create(body=body, namespace=meta["namespace"])
        except ApiException as exc:  # an event is best effort: never fail a reconcile over it
            log.warning("event %s on %s not recorded: %s", reason, meta["name"], exc.reason)


def list_in(kube: Kube, api_version: str, kind: str, namespaces: tuple[str, ...]) -> list[Obj]:
    """Every ``kind`` in ``namespaces``, or in the whole cluster when none are given (the operator's scope)."""
    if not namespaces:
        return kube.list(api_version, kind)
    return [found for namespace in namespaces for found in kube.list(api_version, kind, namespace=namespace)]
