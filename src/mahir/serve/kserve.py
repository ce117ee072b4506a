"""`mahir export --kserve`: a KServe InferenceService that serves a Triton model repository.

The manifest is plain data (dicts, dumped with yaml.safe_dump): KServe's Triton runtime
(modelFormat "triton", Open Inference Protocol v2) downloads the repository from `storageUri`
and serves every model in it. Resources are sized from the model file: the weights are loaded
once per instance, plus room for the server and activations.
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml

from mahir.errors import BadInput

API_VERSION = "serving.kserve.io/v1beta1"
_MIB = 2**20


def inference_service(
    name: str, storage_uri: str, *, model_bytes: int, instances: int = 1, gpus: int = 0
) -> dict[str, Any]:
    """The InferenceService for a repository at `storage_uri` (s3://, gs://, pvc://, https://);
    `gpus`: the GPUs its pod asks for (0: none)."""
    if not re.match(r"[a-z][a-z0-9+.-]*://\S+$", storage_uri):
        raise BadInput(
            f"--storage-uri {storage_uri!r} is no URI: give where the Triton repository will be, "
            "such as s3://bucket/models, gs://bucket/models or pvc://claim/models"
        )
    if instances < 1:
        raise BadInput(f"--instances must be at least 1, got {instances}")
    return {
        "apiVersion": API_VERSION,
        "kind": "InferenceService",
        "metadata": {"name": service_name(name)},
        "spec": {
            "predictor": {
                "model": {
                    "modelFormat": {"name": "triton"},
                    "protocolVersion": "v2",
                    "storageUri": storage_uri,
                    "resources": resources(model_bytes, instances=instances, gpus=gpus),
                }
            }
        },
    }


def resources(model_bytes: int, *, instances: int = 1, gpus: int = 0) -> dict[str, Any]:
    """CPU and memory for Triton with `instances` copies of a model of `model_bytes`: 1 GiB for
    the server plus three times the weights per instance (weights, runtime copies, activations),
    limits at twice the requests so a burst does not get the pod killed; `gpus` NVIDIA GPUs
    (requests and limits alike, as Kubernetes wants for extended resources)."""
    memory_mib = 1024 + 3 * instances * model_bytes / _MIB
    memory_mib = 256 * math.ceil(memory_mib / 256)
    requests: dict[str, str] = {"cpu": str(instances), "memory": f"{memory_mib}Mi"}
    limits: dict[str, str] = {"cpu": str(2 * instances), "memory": f"{2 * memory_mib}Mi"}
    if gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(gpus)
    return {"requests": requests, "limits": limits}


def service_name(name: str) -> str:
    """A Kubernetes name (DNS-1035: lower case, digits, '-', a letter first); KServe appends
    '-predictor' and more, so it stays under 45 characters."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not cleaned or not cleaned[0].isalpha():
        cleaned = f"m-{cleaned}".rstrip("-")
    return cleaned[:45].rstrip("-")


def to_yaml(manifest: dict[str, Any]) -> str:
    text: str = yaml.safe_dump(manifest, sort_keys=False)
    return text
