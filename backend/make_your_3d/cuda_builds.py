"""Which PyTorch CUDA build fits this NVIDIA card and driver: one table, standard library only.

One copy serves both sides: the backend's `doctor` imports it as `make_your_3d.cuda_builds`, and the
Blender add-on (which never imports the backend) loads this same file by path from the bundled
backend source (`blender_addon/runtime.py`, `load_cuda_builds`). So it must stay standard library
only and import nothing from the package.

Why a table: the default index (cu124, before issue 28) stops at older torch releases than the one
the project is tested with and carries no kernels for the RTX 50 series (compute capability 12.0),
so the install succeeded and the first GPU operation failed ("no kernel image is available").

Source for the builds of torch 2.13.0 (checked 2026-12-05): PyTorch's wheel variants as mirrored by
the PyG wheel index (https://data.pyg.org/whl/nightly/ lists torch-2.13.0+cu126, +cu130 and +cu132;
2.11 also had cu128, 2.12 and 2.13 do not). CUDA 13 dropped Maxwell, Pascal and Volta (compute
capability below 7.5), so cu126 is the only 2.13 build for a GTX 10 series card; cu126 ships no
Blackwell (12.0) kernels, so an RTX 50 card needs cu130. The driver must offer at least the build's
CUDA version (`nvidia-smi`'s "CUDA Version"); we do not lean on minor-version compatibility, whose
PTX just-in-time path fails on older drivers. cu132 is left out: it needs a newer driver than cu130
and adds no card.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

TORCH_VERSION = "2.13.0"  # the version the project is tested with (README's install command)
INDEX_ROOT = "https://download.pytorch.org/whl/"


@dataclass(frozen=True)
class CudaBuild:
    """One PyTorch CUDA wheel variant of TORCH_VERSION."""

    tag: str  # "cu130"
    cuda: tuple[int, int]  # the CUDA runtime it bundles; the driver must offer at least this
    min_cc: tuple[int, int]  # lowest compute capability it has kernels for
    max_cc: tuple[int, int]  # highest (binary compatible within a major: 8.6 kernels run on 8.9)
    min_driver: str  # the Linux driver that first offers `cuda`, for the fallback sentence

    @property
    def index_url(self) -> str:
        return INDEX_ROOT + self.tag

    @property
    def spec(self) -> str:
        return f"torch=={TORCH_VERSION}"

    @property
    def pip_args(self) -> list[str]:
        """`pip install` arguments that put this build in."""
        return [self.spec, "--index-url", self.index_url]

    @property
    def cuda_text(self) -> str:
        return f"{self.cuda[0]}.{self.cuda[1]}"


# In order of preference: the newest CUDA first, the older one for older drivers and older cards.
BUILDS: tuple[CudaBuild, ...] = (
    CudaBuild("cu130", (13, 0), (7, 5), (12, 1), "580"),
    CudaBuild("cu126", (12, 6), (5, 0), (9, 0), "560"),
)

# Driver branch -> the newest CUDA it offers (NVIDIA's CUDA toolkit release notes, Linux drivers);
# used only when nvidia-smi's header does not print "CUDA Version".
DRIVER_CUDA: tuple[tuple[int, tuple[int, int]], ...] = (
    (580, (13, 0)), (575, (12, 9)), (570, (12, 8)), (560, (12, 6)), (555, (12, 5)), (550, (12, 4)),
    (545, (12, 3)), (535, (12, 2)), (530, (12, 1)), (525, (12, 0)), (520, (11, 8)),
)


@dataclass(frozen=True)
class GpuInfo:
    """What nvidia-smi says about the first GPU."""

    name: str
    compute_cap: tuple[int, int]
    driver_version: str
    driver_cuda: tuple[int, int] | None


@dataclass(frozen=True)
class Choice:
    """The build to install, or None with a sentence that says what to do instead."""

    build: CudaBuild | None
    message: str


def _version_pair(text: str) -> tuple[int, int] | None:
    match = re.match(r"\s*(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def driver_cuda_from_version(driver_version: str) -> tuple[int, int] | None:
    """The newest CUDA a driver offers, from its branch number (580.95.05 -> 13.0)."""
    match = re.match(r"\s*(\d+)", driver_version)
    if not match:
        return None
    branch = int(match.group(1))
    return next((cuda for first, cuda in DRIVER_CUDA if branch >= first), None)


def parse_nvidia_smi(query_csv: str, plain: str = "") -> GpuInfo | None:
    """GpuInfo from `nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader`
    (first line) and, for the driver's CUDA version, plain `nvidia-smi`'s header."""
    for line in query_csv.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3:
            continue
        cc = _version_pair(parts[-2])
        if cc is None:
            continue
        name, driver = ", ".join(parts[:-2]), parts[-1]
        match = re.search(r"CUDA Version:\s*(\d+\.\d+)", plain)
        cuda = _version_pair(match.group(1)) if match else driver_cuda_from_version(driver)
        return GpuInfo(name=name, compute_cap=cc, driver_version=driver, driver_cuda=cuda)
    return None


def choose(gpu: GpuInfo) -> Choice:
    """The preferred build with kernels for the card that the driver can run, else what to do."""
    cc, cuda = gpu.compute_cap, gpu.driver_cuda
    cc_text = f"{cc[0]}.{cc[1]}"
    for_card = [b for b in BUILDS if b.min_cc <= cc and (cc[0], 0) <= b.max_cc]
    if not for_card:
        return Choice(None, f"The {gpu.name} (compute capability {cc_text}) is not supported by any PyTorch "
                            f"{TORCH_VERSION} CUDA build; jobs will run on the CPU (slow: use the fast preset).")
    fits = [b for b in for_card if cuda is not None and cuda >= b.cuda]
    if fits:
        best = fits[0]
        return Choice(best, f"{gpu.name} (compute capability {cc_text}, driver {gpu.driver_version}): "
                            f"PyTorch {TORCH_VERSION} with CUDA {best.cuda_text} ({best.index_url}).")
    need = for_card[-1]  # the build needing the oldest driver that still has kernels for this card
    have = f"CUDA {cuda[0]}.{cuda[1]}" if cuda else "an unknown CUDA version"
    return Choice(None, f"The NVIDIA driver {gpu.driver_version} offers {have}, too old for the PyTorch {TORCH_VERSION} "
                        f"build the {gpu.name} needs (CUDA {need.cuda_text}): update the driver to version "
                        f"{need.min_driver} or newer (nvidia.com/drivers), then install the backend again (Install Backend in the "
                        f"add-on's preferences); until then jobs run on the CPU.")


def query_gpu(timeout: float = 15.0) -> GpuInfo | None:
    """Ask nvidia-smi about the first GPU; None without an NVIDIA driver that answers."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    flags = 0x08000000 if hasattr(subprocess, "CREATE_NO_WINDOW") else 0  # no console window on Windows
    try:
        csv = subprocess.run([exe, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, creationflags=flags)
        plain = subprocess.run([exe], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, creationflags=flags)
    except (OSError, subprocess.SubprocessError):
        return None
    if csv.returncode != 0:
        return None
    return parse_nvidia_smi(csv.stdout, plain.stdout if plain.returncode == 0 else "")


def verify_script(gpu_name: str, build_tag: str) -> str:
    """`python -c` source run after the install: one small matmul on the GPU, or an ERROR line naming
    the card and the build (the add-on's task shows the last ERROR line) and exit code 1."""
    return (
        "import sys\n"
        "try:\n"
        "    import torch\n"
        "    a = torch.ones(64, 64, device='cuda')\n"
        "    v = float((a @ a).sum().item())\n"
        "    assert v == 64.0 ** 3, v\n"
        "    print('GPU check passed:', torch.cuda.get_device_name(0), 'with torch', torch.__version__)\n"
        "except Exception as exc:\n"
        "    reason = (str(exc) or type(exc).__name__).splitlines()[0]\n"
        f"    print('ERROR: the PyTorch ' + {build_tag!r} + ' build cannot run on the ' + {gpu_name!r} + ': ' + reason + "
        "'. Run make-your-3d doctor, update the NVIDIA driver, then install the backend again.')\n"
        "    sys.exit(1)\n"
    )
