"""Pure mappers: FHIR R4 resources -> IOP episodes, EpisodeOfCare resources and referral records."""

__all__: list[str] = []
