"""rexecpf's HTTP plumbing shared by the API, the site, the proxy and the tunnel."""
