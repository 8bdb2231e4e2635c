#!/usr/bin/env bash
# Build clm's image and push it to a registry.
#
#   IMAGE=us-docker.pkg.dev/PROJECT/REPO/clm:tpu docker/build_and_push_image.sh        # TPU, torch_xla (default)
#   IMAGE=us-docker.pkg.dev/PROJECT/REPO/clm:cpu docker/build_and_push_image.sh cpu
#   IMAGE=us-docker.pkg.dev/PROJECT/REPO/clm:gpu docker/build_and_push_image.sh gpu    # CUDA, DTensor
#   IMAGE=us-docker.pkg.dev/PROJECT/REPO/clm:torchtpu docker/build_and_push_image.sh torchtpu
#
# IMAGE defaults to gcr.io/<gcloud's current project>/clm:<target>. DRY_RUN=1 prints the
# docker commands instead of running them.
set -euo pipefail

TARGET="${1:-tpu}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DOCKERFILE="${ROOT}/docker/${TARGET}/Dockerfile"
if [[ ! -f "${DOCKERFILE}" ]]; then
  echo "error: unknown target '${TARGET}': use tpu, cpu, gpu or torchtpu (docker/<target>/Dockerfile)" >&2
  exit 2
fi
if [[ -z "${IMAGE:-}" ]]; then
  PROJECT="$(gcloud config get-value project 2>/dev/null || true)"
  if [[ -z "${PROJECT}" ]]; then
    echo "error: set IMAGE=REGISTRY/NAME:TAG (or a gcloud project for gcr.io/PROJECT/clm:${TARGET})" >&2
    exit 2
  fi
  IMAGE="gcr.io/${PROJECT}/clm:${TARGET}"
fi

run() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    echo "$*"
  else
    "$@"
  fi
}

run docker build --file "${DOCKERFILE}" --tag "${IMAGE}" "${ROOT}"
run docker push "${IMAGE}"
echo "image: ${IMAGE}"
