"""The shared CRD memory bank: one Ray actor per job that every training worker reads and writes."""

from services.membank.actor import BankActor, bank_actor_name, create_bank_actor
from services.membank.client import RemoteBank

__all__ = ["BankActor", "RemoteBank", "bank_actor_name", "create_bank_actor"]
