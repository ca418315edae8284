"""A real S3 endpoint for tests: moto's server in its own process, with authentication on.

Requests are signed and checked like on AWS: the fixture creates IAM users whose keys
work, and unknown keys are refused (``InvalidAccessKeyId``).
"""

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import boto3

from difftrain.local import free_port

# moto lets this many requests through unauthenticated: enough to create the users.
_SETUP_REQUESTS = 7
_ALL_S3 = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}
_READ_ONLY = {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}


@dataclass
class Keys:
    access_key_id: str
    secret_access_key: str

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
        }


@dataclass
class S3Server:
    endpoint: str
    admin: Keys
    reader: Keys
    process: subprocess.Popen

    def client(self, keys: Keys | None = None):
        keys = keys or self.admin
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=keys.access_key_id,
            aws_secret_access_key=keys.secret_access_key,
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


def start_s3_server() -> S3Server:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(_SETUP_REQUESTS))
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("the moto S3 server did not start") from None
            time.sleep(0.1)
    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="setup",
        aws_secret_access_key="setup",
    )
    users = {}
    for name, statement in (("admin", _ALL_S3), ("reader", _READ_ONLY)):
        iam.create_user(UserName=name)
        key = iam.create_access_key(UserName=name)["AccessKey"]
        iam.put_user_policy(
            UserName=name,
            PolicyName="s3",
            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [statement]}),
        )
        users[name] = Keys(key["AccessKeyId"], key["SecretAccessKey"])
    return S3Server(endpoint, users["admin"], users["reader"], process)
