"""Pure mappers: FHIR R4 resources -> IOP episodes, EpisodeOfCare resources and referral records."""

from mappers.codes import LEVEL_SYSTEM
from mappers.episode_of_care import EpisodeOfCareError, episode_of_care
from mappers.episodes import (
    EPISODE_NAMESPACE,
    MappingResult,
    anchor_key,
    episode_id,
    map_episodes,
    review_after,
)
from mappers.index import Reject
from mappers.levels import Classification, classify_encounter
from mappers.referrals import REFERRAL_NAMESPACE, ReferralResult, map_referrals, referral_id
from mappers.rules import LEVEL_RANK, Rule, Rules, RulesError, default_rules, load_rules
from mappers.settings import EpisodeSettings, PayerProfile

__all__ = [
    "EPISODE_NAMESPACE",
    "LEVEL_RANK",
    "LEVEL_SYSTEM",
    "REFERRAL_NAMESPACE",
    "Classification",
    "EpisodeOfCareError",
    "EpisodeSettings",
    "MappingResult",
    "PayerProfile",
    "ReferralResult",
    "Reject",
    "Rule",
    "Rules",
    "RulesError",
    "anchor_key",
    "classify_encounter",
    "default_rules",
    "episode_id",
    "episode_of_care",
    "load_rules",
    "map_episodes",
    "map_referrals",
    "referral_id",
    "review_after",
]
