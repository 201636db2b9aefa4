"""The endpoint picker (EPP): the scheduler served to Envoy over the GIE ext_proc protocol, plus
`POST /v1/pick`, gRPC health and metrics; and the Envoy gateway in front of the workers."""
