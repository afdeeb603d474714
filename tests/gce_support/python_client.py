"""Google's own Python client (google-cloud-compute, REST transport) against the emulator.

Usage: python_client.py ENDPOINT PROJECT ZONE TOKEN; prints one JSON object of what it saw.
"""
import json
import sys

import google.oauth2.credentials
import requests
from google.api_core import exceptions
from google.cloud import compute_v1

endpoint, project, zone, token = sys.argv[1:5]
options = {"api_endpoint": endpoint}
client = compute_v1.InstancesClient(
    credentials=google.oauth2.credentials.Credentials(token),
    transport="rest",
    client_options=options,
)
out = {}

# A filter and paging: the pager follows nextPageToken, one instance per page.
pages = client.list(
    request=compute_v1.ListInstancesRequest(
        project=project, zone=zone, filter='name eq "web-.*"', max_results=1
    )
)
out["filtered"] = [i.name for i in pages]
out["pages"] = sum(1 for _ in client.list(
    request=compute_v1.ListInstancesRequest(project=project, zone=zone, max_results=1)
).pages)
out["running"] = [
    i.name
    for i in client.list(
        request=compute_v1.ListInstancesRequest(
            project=project, zone=zone, filter="status = RUNNING"
        )
    )
]

# aggregatedList: (scope, InstancesScopedList) pairs.
agg = client.aggregated_list(
    request=compute_v1.AggregatedListInstancesRequest(
        project=project, filter='name = "web-1"'
    )
)
out["aggregated"] = sorted(
    f"{scope}/{i.name}" for scope, scoped in agg for i in scoped.instances
)

got = client.get(project=project, zone=zone, instance="web-1")
out["get"] = {"name": got.name, "status": got.status, "labels": dict(got.labels)}

# No credentials at all: the client's own session would try to refresh anonymous
# credentials on the 401, so send the bare request and let api_core read the answer as the
# client does for any error.
r = requests.get(f"{endpoint}/compute/v1/projects/{project}/zones/{zone}/instances")
e = exceptions.from_http_response(r)
out["anonymous"] = {
    "type": type(e).__name__,
    "code": e.code,
    "reason": e.reason,
    "errors": [er.get("reason") for er in e.errors],
}

print(json.dumps(out))
