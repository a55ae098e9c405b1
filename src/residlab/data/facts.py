"""Factual-recall prompts: a table of countries and their capitals, shipped with residlab.

The capital facts are common knowledge (public-domain), chosen for countries and capitals whose names are
widely known in English text, so that even small models recall many of them. Used by the factual-recall
analysis and the ``capitals`` patching dataset (the corrupted prompt names another country).
"""

from __future__ import annotations

from typing import NamedTuple


class Fact(NamedTuple):
    """A subject, and the answer a model should recall for it."""

    subject: str
    answer: str


CAPITALS: tuple[Fact, ...] = tuple(
    Fact(country, capital)
    for country, capital in (
        ("France", "Paris"),
        ("Germany", "Berlin"),
        ("Italy", "Rome"),
        ("Spain", "Madrid"),
        ("Portugal", "Lisbon"),
        ("Japan", "Tokyo"),
        ("China", "Beijing"),
        ("Russia", "Moscow"),
        ("Egypt", "Cairo"),
        ("Greece", "Athens"),
        ("Austria", "Vienna"),
        ("Hungary", "Budapest"),
        ("Poland", "Warsaw"),
        ("Ireland", "Dublin"),
        ("Norway", "Oslo"),
        ("Sweden", "Stockholm"),
        ("Finland", "Helsinki"),
        ("Denmark", "Copenhagen"),
        ("Belgium", "Brussels"),
        ("Netherlands", "Amsterdam"),
        ("Czech Republic", "Prague"),
        ("Thailand", "Bangkok"),
        ("South Korea", "Seoul"),
        ("Indonesia", "Jakarta"),
        ("Philippines", "Manila"),
        ("Vietnam", "Hanoi"),
        ("India", "New Delhi"),
        ("Pakistan", "Islamabad"),
        ("Iran", "Tehran"),
        ("Iraq", "Baghdad"),
        ("Turkey", "Ankara"),
        ("Israel", "Jerusalem"),
        ("Saudi Arabia", "Riyadh"),
        ("Kenya", "Nairobi"),
        ("Nigeria", "Abuja"),
        ("Ethiopia", "Addis Ababa"),
        ("Argentina", "Buenos Aires"),
        ("Peru", "Lima"),
        ("Chile", "Santiago"),
        ("Colombia", "Bogota"),
        ("Venezuela", "Caracas"),
        ("Cuba", "Havana"),
        ("Mexico", "Mexico City"),
        ("Canada", "Ottawa"),
        ("Australia", "Canberra"),
        ("New Zealand", "Wellington"),
        ("Brazil", "Brasilia"),
        ("Ukraine", "Kyiv"),
        ("Romania", "Bucharest"),
        ("Bulgaria", "Sofia"),
        ("Serbia", "Belgrade"),
        ("Croatia", "Zagreb"),
        ("Switzerland", "Bern"),
        ("Iceland", "Reykjavik"),
        ("Morocco", "Rabat"),
        ("Afghanistan", "Kabul"),
        ("Bangladesh", "Dhaka"),
        ("Nepal", "Kathmandu"),
        ("Malaysia", "Kuala Lumpur"),
        ("Singapore", "Singapore"),
        ("Lebanon", "Beirut"),
        ("Syria", "Damascus"),
        ("Jordan", "Amman"),
        ("Qatar", "Doha"),
        ("Ghana", "Accra"),
        ("Uganda", "Kampala"),
        ("Zimbabwe", "Harare"),
        ("Senegal", "Dakar"),
        ("Estonia", "Tallinn"),
        ("Latvia", "Riga"),
        ("Lithuania", "Vilnius"),
        ("Slovakia", "Bratislava"),
        ("Slovenia", "Ljubljana"),
        ("Georgia", "Tbilisi"),
        ("Armenia", "Yerevan"),
        ("Mongolia", "Ulaanbaatar"),
        ("Cambodia", "Phnom Penh"),
        ("Taiwan", "Taipei"),
        ("Uruguay", "Montevideo"),
        ("Ecuador", "Quito"),
    )
)
"""Countries and capitals (one fact each; a few countries also have other seats of government)."""

CAPITAL_PROMPT = "The capital of {subject} is"
"""The prompt template; the answer is the capital, read as the next token(s)."""
