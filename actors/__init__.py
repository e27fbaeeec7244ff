"""Actors: the actor loop, built-in tasks and evaluation."""
from chorus.actors.actor import Actor
from chorus.actors.actor import ActorConfig
from chorus.actors.evaluation import evaluate
from chorus.actors.tasks import make_task
