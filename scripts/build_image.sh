#!/usr/bin/env bash
# Build the serving image from deploy/Dockerfile with whatever engine is here, offline when it must be.
#   bash scripts/build_image.sh [cpu|gpu]        # `make image` / `make image-gpu`: -> vae-serve:cpu | vae-serve:gpu
#
# Environment (all optional):
#   MODEL_DIR=DIR         bake that export into /models (staged as build/image-model/ in the context)
#   IMAGE_TAG             default vae-serve:<target>, or vae-serve:<target>-<model version> with MODEL_DIR
#   ENGINE                docker | podman | buildah; default docker when its daemon answers, else podman,
#                         else buildah
#   PYTHON_IMAGE, CPU_RUNTIME_IMAGE, CUDA_IMAGE, ONNXRUNTIME_VERSION
#                         build args; unset = the Dockerfile's. A base image that is neither in local storage
#                         nor pullable is replaced by a local substitute built with mmdebstrap (Debian 12,
#                         Python 3.11: the same minor as the images the Dockerfile names), once: a substitute
#                         already in local storage is reused. CUDA_IMAGE has no substitute (see deploy/README.md).
#   WHEEL_PYTHON          CPython minor of the wheelhouse; default 3.11 (cpu) / 3.12 (gpu: Ubuntu 24.04)
#   WHEELHOUSE=auto|off   auto (default): the host's pip (its index, CA bundle and proxy configuration) downloads
#                         the image's wheels into deploy/wheelhouse/<target>/ and the build installs them with --no-index;
#                         off: pip inside the build reaches the index itself (needs a CA the container trusts).
#   HOST_PYTHON           the host's Python >= 3.11 with pip, for the wheelhouse; default .venv/bin/python, else python3
# Podman runs with scripts/podman/containers.conf (runc, ulimits) unless CONTAINERS_CONF is set.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=${1:-cpu}
[[ $TARGET == cpu || $TARGET == gpu ]] || { echo "build_image: target must be cpu or gpu, got $TARGET" >&2; exit 2; }
IMAGE_TAG_GIVEN=${IMAGE_TAG:-}
IMAGE_TAG=${IMAGE_TAG:-vae-serve:$TARGET}
WHEELHOUSE=${WHEELHOUSE:-auto}
if [[ -z ${HOST_PYTHON:-} ]]; then [[ -x .venv/bin/python ]] && HOST_PYTHON=.venv/bin/python || HOST_PYTHON=python3; fi
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/scripts/podman/containers.conf}
SUBSTITUTE_PYTHON=localhost/vae-serve-base/python:3.11-bookworm
SUBSTITUTE_RUNTIME=localhost/vae-serve-base/python3-debian12:nonroot
T0=$SECONDS
step() { printf '[build_image %4ds] %s\n' "$((SECONDS - T0))" "$*"; }
dockerfile_arg() { sed -n "s/^ARG $1=//p" deploy/Dockerfile; }

# ---- engine ------------------------------------------------------------------------------------------
if [[ -z ${ENGINE:-} ]]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker
  elif command -v podman >/dev/null; then ENGINE=podman
  elif command -v buildah >/dev/null; then ENGINE=buildah
  else echo "build_image: no docker daemon, podman or buildah (bash scripts/ensure_system_tools.sh podman)" >&2; exit 1; fi
fi
image_exists() {
  case $ENGINE in
    docker) docker image inspect "$1" >/dev/null 2>&1 ;;
    podman) podman image exists "$1" ;;
    buildah) buildah inspect --type image "$1" >/dev/null 2>&1 ;;
  esac
}
qualified() { [[ $1 == */* ]] && { [[ ${1%%/*} == *.* || ${1%%/*} == localhost ]] && echo "$1" || echo "docker.io/$1"; } || echo "docker.io/library/$1"; }
pull() { timeout 60 "$ENGINE" pull -q "$(qualified "$1")" >/dev/null 2>&1; }
import_rootfs() {  # import_rootfs DIR NAME CHANGE...: a root file system directory as a local image
  local dir=$1 name=$2; shift 2
  local changes=(); for c in "$@"; do changes+=(--change "$c"); done
  case $ENGINE in
    docker) tar -C "$dir" --numeric-owner -cf - . | docker import "${changes[@]}" - "$name" >/dev/null ;;
    *) tar -C "$dir" --numeric-owner -cf - . | podman import -q "${changes[@]}" - "$name" >/dev/null ;;
  esac
}

# ---- base images: the Dockerfile's, else local substitutes built with mmdebstrap -----------------------
build_substitute() {  # build_substitute python|runtime
  command -v mmdebstrap >/dev/null || { echo "build_image: mmdebstrap missing (bash scripts/ensure_system_tools.sh mmdebstrap)" >&2; exit 1; }
  local root; root=$(mktemp -d)
  local path="ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  if [[ $1 == python ]]; then
    step "building $SUBSTITUTE_PYTHON with mmdebstrap (Debian 12: python3 + pip; build stages only)"
    mmdebstrap --quiet --variant=apt --include=python3,python3-pip,python-is-python3,ca-certificates \
      bookworm "$root/rootfs"
    import_rootfs "$root/rootfs" "$SUBSTITUTE_PYTHON" "$path"
  else
    # Like gcr.io/distroless/python3-debian12:nonroot: Debian's CPython 3.11 and the C/C++ runtime, unpacked
    # without maintainer scripts (no shell, no package manager), user nonroot 65532.
    step "building $SUBSTITUTE_RUNTIME with mmdebstrap (Debian 12 CPython 3.11, no shell; distroless stand-in)"
    mmdebstrap --quiet --variant=extract \
      --include=base-files,netbase,tzdata,libstdc++6,python3.11-minimal,libpython3.11-stdlib \
      bookworm "$root/rootfs"
    local r=$root/rootfs
    ln -sf python3.11 "$r/usr/bin/python3"
    rm -f "$r/bin/tar"  # unpacked as a dependency of dpkg; distroless has no tar either
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$r/etc/passwd"
    printf 'root:x:0:\nnonroot:x:65532:\n' >"$r/etc/group"
    mkdir -p "$r/home/nonroot" "$r/tmp" && chown 65532:65532 "$r/home/nonroot" && chmod 1777 "$r/tmp"
    import_rootfs "$r" "$SUBSTITUTE_RUNTIME" "$path" "USER 65532:65532" "WORKDIR /home/nonroot"
  fi
  rm -rf "$root"
}
resolve_base() {  # resolve_base ARG KIND: echoes the image to use for build arg ARG
  local want=${!1:-$(dockerfile_arg "$1")}
  if image_exists "$want" || image_exists "$(qualified "$want")"; then echo "$want"; return; fi
  if [[ -n ${!1:-} ]]; then echo "build_image: $1=$want is not in local storage" >&2; exit 1; fi
  step "pulling $want" >&2
  if pull "$want"; then echo "$want"; return; fi
  local sub; [[ $2 == python ]] && sub=$SUBSTITUTE_PYTHON || sub=$SUBSTITUTE_RUNTIME
  if image_exists "$sub"; then step "$want unreachable: reusing $sub from local storage" >&2
  else step "$want unreachable: building a substitute" >&2; build_substitute "$2" >&2; fi
  echo "$sub"
}

build_args=(--build-arg "PYTHON_IMAGE=$(resolve_base PYTHON_IMAGE python)")
if [[ $TARGET == cpu ]]; then
  build_args+=(--build-arg "CPU_RUNTIME_IMAGE=$(resolve_base CPU_RUNTIME_IMAGE runtime)")
else
  cuda=${CUDA_IMAGE:-$(dockerfile_arg CUDA_IMAGE)}
  if ! image_exists "$cuda" && ! image_exists "$(qualified "$cuda")" && ! pull "$cuda"; then
    echo "build_image: $cuda is neither in local storage nor pullable; pass CUDA_IMAGE=<a local CUDA 13 +" \
         "cuDNN 9 image> (there is no substitute: the CUDA libraries cannot be built here)" >&2
    exit 1
  fi
  build_args+=(--build-arg "CUDA_IMAGE=$cuda")
fi
[[ -n ${ONNXRUNTIME_VERSION:-} ]] && build_args+=(--build-arg "ONNXRUNTIME_VERSION=$ONNXRUNTIME_VERSION")
if [[ -n ${MODEL_DIR:-} ]]; then
  [[ -f $MODEL_DIR/model.json ]] || { echo "build_image: $MODEL_DIR/model.json missing: run make demo or python -m training.export --out $MODEL_DIR" >&2; exit 1; }
  # Staged into the (allow-listed) context; the tag names the model version unless IMAGE_TAG is given.
  rm -rf build/image-model && mkdir -p build && cp -r "$MODEL_DIR" build/image-model
  build_args+=(--build-arg MODEL_DIR=build/image-model)
  version=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' "$MODEL_DIR/model.json")
  [[ -n ${IMAGE_TAG_GIVEN:-} ]] || IMAGE_TAG=vae-serve:$TARGET-$version
fi

# ---- wheelhouse: the image's wheels, downloaded by the host's pip ------------------------------------
if [[ $WHEELHOUSE == auto ]]; then
  ort=${ONNXRUNTIME_VERSION:-$(dockerfile_arg ONNXRUNTIME_VERSION)}
  # The CPU image runs Debian 12's CPython 3.11; the GPU image Ubuntu 24.04's 3.12 (WHEEL_PYTHON for another base).
  pyver=3.11; [[ $TARGET == gpu ]] && pyver=3.12
  pyver=${WHEEL_PYTHON:-$pyver}
  req=$(mktemp); trap 'rm -f "$req"' EXIT
  "$HOST_PYTHON" -m pip --version >/dev/null 2>&1 || { echo "build_image: $HOST_PYTHON has no pip (make venv, or HOST_PYTHON=...; or WHEELHOUSE=off)" >&2; exit 1; }
  "$HOST_PYTHON" deploy/serve_requirements.py --variant "$TARGET" --onnxruntime-version "$ort" >"$req"
  step "wheelhouse: pip download (host configuration) for CPython $pyver manylinux x86_64 -> deploy/wheelhouse/$TARGET/"
  "$HOST_PYTHON" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --dest "deploy/wheelhouse/$TARGET" \
    --python-version "$pyver" --implementation cp --abi "cp${pyver/./}" --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -r "$req"
  step "wheelhouse: $(find "deploy/wheelhouse/$TARGET" -name '*.whl' | wc -l) wheels, $(du -sh "deploy/wheelhouse/$TARGET" | cut -f1)"
elif [[ $WHEELHOUSE == off ]]; then
  find "deploy/wheelhouse/$TARGET" -name '*.whl' -delete  # an empty wheelhouse: pip in the build uses the index
else
  echo "build_image: WHEELHOUSE must be auto or off, got $WHEELHOUSE" >&2; exit 2
fi

# ---- build ---------------------------------------------------------------------------------------------
step "building $IMAGE_TAG (target $TARGET) with $ENGINE: ${build_args[*]}"
t_build=$SECONDS
case $ENGINE in
  docker) docker build -f deploy/Dockerfile --target "$TARGET" -t "$IMAGE_TAG" "${build_args[@]}" . ;;
  # chroot isolation: RUN steps without an OCI runtime (nested sandboxes cannot always start one)
  podman) podman build --isolation chroot --pull=never -f deploy/Dockerfile --target "$TARGET" -t "$IMAGE_TAG" "${build_args[@]}" . ;;
  buildah) buildah bud --isolation chroot --pull=never -f deploy/Dockerfile --target "$TARGET" -t "$IMAGE_TAG" "${build_args[@]}" . ;;
  *) echo "build_image: unknown ENGINE $ENGINE" >&2; exit 2 ;;
esac
size=$("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE_TAG" 2>/dev/null || echo 0)
step "built $IMAGE_TAG: $((size / 1000000)) MB, build step $((SECONDS - t_build)) s, total $((SECONDS - T0)) s"
