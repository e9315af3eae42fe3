"""The KServe storage-initializer step: download every object under an S3 prefix to a local directory, then exit.

Done the way KServe's `Storage._download_s3` does it: list the prefix with a boto3 resource and `download_file` each
object (boto3's default transfer settings: multipart, 8 threads) to the same relative path under the target.

    python bench/baselines/s3_download.py s3://BUCKET/PREFIX TARGET_DIR

Endpoint and credentials come from the standard AWS_* variables (AWS_ENDPOINT_URL for an S3-compatible server).
Prints one JSON line: {"files": N, "bytes": B, "seconds": S}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse


def download_prefix(uri: str, target: Path) -> tuple[int, int]:
    import boto3
    from botocore.config import Config

    parsed = urlparse(uri)
    prefix = parsed.path.lstrip("/")
    s3 = boto3.resource(
        "s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL"), config=Config(s3={"addressing_style": "path"})
    )
    bucket = s3.Bucket(parsed.netloc)
    files = size = 0
    for obj in bucket.objects.filter(Prefix=prefix):
        if obj.key.endswith("/"):
            continue
        rel = obj.key[len(prefix) :].lstrip("/") or Path(obj.key).name
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        bucket.download_file(obj.key, str(dest))
        files += 1
        size += obj.size
    if files == 0:
        raise SystemExit(f"s3_download: nothing under {uri}")
    return files, size


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    files, size = download_prefix(args[0], Path(args[1]))
    print(json.dumps({"files": files, "bytes": size, "seconds": round(time.perf_counter() - t0, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
