"""The batched gRPC inference server and its clients.

Nothing is imported here: actors import `client` (gRPC and the shared `config` only), and
must not load JAX or the server through this package.

  config        InferenceServerConfig and gRPC options, shared by server and clients
  client        InferenceClient (actors) and ParameterPublisher (learners)
  service       the gRPC servicer and `start_server`
  served_model  ServedModel: one named model's parameters, version and lanes
  lanes         request rows and the generation and scoring lanes that batch them
  batcher, sampler, scoring: dynamic batching and the compiled sampling and scoring
"""
