"""GETs without botocore's per-request machinery: presigned by botocore, sent with urllib3.

Measured here (bench/RESULTS.md, "Transfer engine"): a botocore ``get_object`` costs about 1.5 ms of
client CPU before the first body byte (event hooks, header objects, response parsing with dateutil),
which for 10,000 small objects is most of the client's CPU and, on a 2-core box shared with the
server, most of its wall time. A SigV4 presigned URL from botocore costs ~0.15 ms and is correct for
every endpoint, partition and addressing style botocore knows; ``Range`` and ``If-Match`` travel as
plain unsigned headers, which S3 accepts on presigned GETs. urllib3 is botocore's own HTTP library.

Errors are raised as botocore ``ClientError`` with the S3 error code, so callers classify them the
same way whichever path served the request. Anything unusual (no credentials, an endpoint we cannot
presign for) makes ``FastGetter.create`` return None and the caller uses plain ``get_object``.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, Optional, Tuple

_CODE = re.compile(rb"<Code>([^<]+)</Code>")
_MSG = re.compile(rb"<Message>([^<]*)</Message>")


class FastGetter:
    def __init__(self, presigner: Any, pool: Any, expires: int = 3600) -> None:
        self._presigner = presigner
        self._pool = pool
        self._expires = expires

    @classmethod
    def create(cls, s3: Any, max_connections: int) -> Optional["FastGetter"]:
        try:
            import boto3
            import urllib3
            from botocore.config import Config

            if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")) or s3.meta.config.proxies:
                return None  # botocore knows the proxy rules (NO_PROXY, per-scheme); keep its path
            creds = s3._request_signer._credentials  # shared object: refreshable role credentials keep refreshing
            if creds is None:
                return None
            cfg = s3.meta.config.merge(Config(signature_version="s3v4"))
            session = boto3.session.Session()
            kw0: Dict[str, Any] = {"region_name": s3.meta.region_name, "config": cfg, "aws_access_key_id": "x", "aws_secret_access_key": "x"}
            presigner = session.client("s3", **kw0)
            if presigner.meta.endpoint_url != s3.meta.endpoint_url:
                # A custom endpoint (a local S3, a VPC endpoint): keep it. For AWS's own endpoint leave it
                # unset, so botocore's rules pick virtual-hosted addressing as they do for the original.
                presigner = session.client("s3", endpoint_url=s3.meta.endpoint_url, **kw0)
            presigner._request_signer._credentials = creds
            ca = os.environ.get("AWS_CA_BUNDLE") or _default_ca()
            verify = s3._endpoint.http_session._verify if hasattr(s3, "_endpoint") else True
            timeout = urllib3.Timeout(connect=s3.meta.config.connect_timeout, read=s3.meta.config.read_timeout)
            kw: Dict[str, Any] = {"maxsize": max_connections, "block": False, "retries": False, "timeout": timeout}
            if verify is False:
                kw["cert_reqs"] = "CERT_NONE"
            elif ca:
                kw["ca_certs"] = verify if isinstance(verify, str) else ca
            return cls(presigner, urllib3.PoolManager(num_pools=4, **kw))
        except Exception:  # noqa: BLE001 - any surprise: use the plain botocore path
            return None

    def get(self, bucket: str, key: str, rng: str = "", if_match: str = "") -> Tuple[Dict[str, str], Any]:
        from botocore.exceptions import ClientError

        url = self._presigner.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=self._expires)
        headers = {}
        if rng:
            headers["Range"] = rng
        if if_match:
            headers["If-Match"] = if_match
        resp = self._pool.request("GET", url, headers=headers, preload_content=False, redirect=False)
        if resp.status not in (200, 206):
            body = resp.read()
            resp.release_conn()
            m, msg = _CODE.search(body), _MSG.search(body)
            code = m.group(1).decode() if m else str(resp.status)
            raise ClientError({"Error": {"Code": code, "Message": msg.group(1).decode() if msg else ""},
                               "ResponseMetadata": {"HTTPStatusCode": resp.status}}, "GetObject")
        meta = {"sse": resp.headers.get("x-amz-server-side-encryption", ""),
                "ssec": resp.headers.get("x-amz-server-side-encryption-customer-algorithm", "")}
        return meta, _Body(resp)


class _Body:
    def __init__(self, resp: Any) -> None:
        self._resp = resp

    def read(self, n: int) -> bytes:
        return self._resp.read(n)

    def close(self) -> None:
        # Drained to the end: the connection goes back to the pool; otherwise it is dropped.
        try:
            self._resp.release_conn()
        except Exception:  # noqa: BLE001
            pass


def _default_ca() -> Optional[str]:
    try:
        from botocore.httpsession import get_cert_path

        return get_cert_path(True)
    except Exception:  # noqa: BLE001
        return None
