"""The batched gRPC inference server and its clients."""
from chorus.inference_server.client import GenerateResult
from chorus.inference_server.client import InferenceClient
from chorus.inference_server.client import InferenceError
from chorus.inference_server.client import LogprobScores
from chorus.inference_server.client import ParameterPublisher
from chorus.inference_server.client import PreferenceScores
from chorus.inference_server.client import RewardScores
from chorus.inference_server.server import InferenceServerConfig
from chorus.inference_server.server import ServedModel
from chorus.inference_server.server import start_server
