"""The toy world: a small closed world of spoken question answering, deterministic from a seed.

Content (all short English sentences, numbers spelled as words so TTS and recognizers read them):
- Q&A pairs in seven categories, answers computed (never typed in):
  ``plus`` / ``minus`` / ``times`` ("What is seven plus five?" -> "Seven plus five is twelve."),
  ``capital`` (60 countries), ``color`` (40 things), ``opposite`` (55 words),
  ``counting`` ("Count from three to six." -> "Three, four, five, six.").
- Asides: 160 utterances NOT addressed to the assistant ("Pass me the salt, please."), the
  speech that speech-in stage 3 labels with state 2 ("heard, do not answer").
- Read sentences: one templated sentence per named entity ("My aunt went to France last
  summer.") and word lists of the asides' other words. The ASR stages hear them (and the
  assistant voice reads the entity ones for speech-out), the text LLM's Q&A never has them. They
  play the part of a real ASR corpus, whose vocabulary covers the words of held-out questions and
  asides without containing those sentences.
- Skill tasks for the text LLM: "Repeat after me: <s>" -> "<s>" and "Transcribe: <s>" -> "<s>".
  Speech-in stage 2 asks the frozen LLM to transcribe; there the audio embeddings stand where
  ``<s>`` stands in the text form (see ``TRANSCRIBE_PREFIX``).
- Dialogues of 1-3 questions (multi-turn Q&A); spoken ones also get asides between questions.

Split (``make_world``): 15 % of the Q&A pairs of every category, and 15 % of the asides, are held
out as ``test``. The text LLM trains on ALL Q&A text: that is its knowledge, as Qwen2-7B knows
its facts before Freeze-Omni adds speech. The speech stages only ever hear ``train`` questions
and asides; evaluation plays ``test`` questions as speech and checks the answers. So spoken test
questions are new sentences to the speech model, though the LLM knows their answers.

Everything follows from ``seed`` (the split, dialogue composition and order); the sentence lists
themselves are fixed.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections import defaultdict
from typing import Sequence

TEST_FRACTION = 0.15
CATEGORIES = ("plus", "minus", "times", "capital", "color", "opposite", "counting")
REPEAT_PREFIX = "Repeat after me: "
TRANSCRIBE_PREFIX = "Transcribe: "
WORD_LIST_PREFIX = "The words on the list are "  # read sentences that list the asides' other words

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def spell(n: int) -> str:
    """0 <= n < 1000 in words: 21 -> "twenty one", 100 -> "one hundred"."""
    if not 0 <= n < 1000:
        raise ValueError(f"spell() covers 0..999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + spell(rest))


def capitalize(s: str) -> str:
    return s[:1].upper() + s[1:]


def normalize(text: str) -> str:
    """Lower case, punctuation dropped, single spaces: the form transcripts are scored in."""
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def answer_matches(answer: str, reference: str) -> bool:
    """The toy world's scoring rule: the whole answer's normalized words equal the reference's.

    Used for text answers, speech-in -> text-out answers and recognizer transcripts of spoken
    answers alike. Strict on purpose: a right number in a wrong sentence does not count.
    """
    return normalize(answer) == normalize(reference)


# --- fixed content ----------------------------------------------------------------------------

CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("England", "London"), ("Ireland", "Dublin"), ("Scotland", "Edinburgh"),
    ("Wales", "Cardiff"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Hungary", "Budapest"),
    ("Greece", "Athens"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("India", "New Delhi"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
    ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Colombia", "Bogota"), ("Cuba", "Havana"), ("Kenya", "Nairobi"), ("Ghana", "Accra"),
    ("Uganda", "Kampala"), ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("South Korea", "Seoul"),
    ("Indonesia", "Jakarta"), ("the Philippines", "Manila"), ("Australia", "Canberra"),
    ("New Zealand", "Wellington"), ("Belgium", "Brussels"), ("the Netherlands", "Amsterdam"),
    ("Switzerland", "Bern"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"),
    ("Croatia", "Zagreb"), ("Pakistan", "Islamabad"), ("Ecuador", "Quito"),
    ("Saudi Arabia", "Riyadh"), ("Syria", "Damascus"), ("Lebanon", "Beirut"),
    ("South Africa", "Pretoria"), ("Venezuela", "Caracas"), ("Jamaica", "Kingston"),
    ("Malaysia", "Kuala Lumpur"), ("the United States", "Washington"),
)

COLORS = (
    ("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"),
    ("a banana", "yellow"), ("a lemon", "yellow"), ("a tomato", "red"), ("a strawberry", "red"),
    ("an orange", "orange"), ("a carrot", "orange"), ("a pumpkin", "orange"), ("milk", "white"),
    ("chocolate", "brown"), ("a frog", "green"), ("a cucumber", "green"), ("a lime", "green"),
    ("blood", "red"), ("a fire truck", "red"), ("the sun", "yellow"), ("a crow", "black"),
    ("a polar bear", "white"), ("an elephant", "gray"), ("a flamingo", "pink"), ("a pig", "pink"),
    ("a plum", "purple"), ("an eggplant", "purple"), ("the ocean", "blue"), ("a blueberry", "blue"),
    ("a cherry", "red"), ("an emerald", "green"), ("a sapphire", "blue"), ("a swan", "white"),
    ("coffee", "brown"), ("tree bark", "brown"), ("lettuce", "green"), ("a cloud", "white"),
    ("a school bus", "yellow"), ("a raven", "black"), ("salt", "white"), ("lavender", "purple"),
)

_BOTH_WAYS = (("hot", "cold"), ("up", "down"), ("day", "night"), ("happy", "sad"), ("wet", "dry"),
              ("full", "empty"), ("rich", "poor"), ("push", "pull"), ("north", "south"),
              ("east", "west"), ("buy", "sell"), ("inside", "outside"), ("above", "below"),
              ("always", "never"), ("loud", "quiet"), ("thick", "thin"), ("early", "late"),
              ("strong", "weak"), ("clean", "dirty"), ("win", "lose"))
_ONE_WAY = (("big", "small"), ("fast", "slow"), ("tall", "short"), ("open", "closed"),
            ("dark", "light"), ("first", "last"), ("young", "old"), ("top", "bottom"),
            ("front", "back"), ("high", "low"), ("sweet", "sour"), ("asleep", "awake"),
            ("yes", "no"), ("true", "false"), ("hard", "soft"))
OPPOSITES = tuple(p for a, b in _BOTH_WAYS for p in ((a, b), (b, a))) + _ONE_WAY

# Speech addressed to someone else, or to nobody: the assistant hears it and stays quiet.
ASIDES = (
    "I left my keys in the car.", "Pass me the salt, please.", "Did you feed the cat?",
    "I think it is going to rain today.", "Can you close the window, honey?",
    "The kids are still asleep upstairs.", "Mom, where did you put my shoes?",
    "We need to buy more milk.", "Hold on, somebody is at the door.", "I will call you back later.",
    "Turn left at the next corner.", "Hey John, are you coming to lunch?",
    "My back hurts after that long walk.", "Let's watch a movie tonight.",
    "Don't forget to lock the door.", "The bus is late again.", "I really like your new haircut.",
    "Sorry, I was talking to my brother.", "Put the box on the table, please.",
    "The dog needs a bath.", "I lost my phone somewhere in the house.",
    "Could you help me carry these bags?", "This coffee is way too strong.",
    "We should leave in ten minutes.", "Wait for me at the station.",
    "My sister is moving to a new house.", "Oh no, I spilled the juice.",
    "Anna, your dinner is getting cold.", "The meeting starts at nine.",
    "I forgot my umbrella at work.", "Can you pick up the children after school?",
    "That song was playing all day.", "Let me finish this email first.",
    "The garden looks lovely this spring.", "I am so tired today.", "Please take out the trash.",
    "He said he would be here by noon.", "My coffee is getting cold.",
    "Give me a second, I am on the phone.", "We are out of bread.",
    "The neighbors are having a party.", "Did you see where I put my glasses?",
    "I need to charge my phone.", "Mark, can you hear me?", "The baby finally fell asleep.",
    "Let's go for a walk after dinner.", "I don't like this weather at all.",
    "Tell your father the car is ready.", "The printer is broken again.",
    "Can you turn the music down a little?", "I will be back in five minutes.",
    "She is bringing a cake to the party.", "My hands are cold.",
    "Bring your jacket, it is windy outside.", "We have to clean the kitchen.",
    "Tom, dinner is ready.", "I think I left the oven on.", "The train was full this morning.",
    "Put your shoes by the door.", "Did anyone call while I was out?",
    "This chair is really comfortable.", "My friend is coming over later.",
    "Careful, the floor is wet.", "I can't find the remote.", "The cat is sleeping on my bed.",
    "Please wash your hands before dinner.", "We are going to the beach on Sunday.",
    "I have a headache.", "Let me know when you are ready.", "The shop closes at six.",
    "Grandma sent us a letter.", "Can you hand me that towel?", "I need a new pair of shoes.",
    "Sara, the water is boiling.", "The kids want pizza for dinner.",
    "I am going to take a shower.", "Your keys are on the kitchen table.",
    "Stop running in the hall.", "My laptop is very slow today.",
    "We should paint the fence this weekend.", "Hurry up, we are late.",
    "I saw your brother at the store.", "The lights are still on upstairs.",
    "Please feed the fish before you go.", "That was a really good dinner.",
    "Let's ask the waiter for the bill.", "I'll meet you at the park.",
    "Who ate the last cookie?", "My watch stopped again.", "The plants need some water.",
    "Did you remember to buy eggs?", "I have to work late tonight.",
    "Can you move your car, please?", "The soup needs more salt.",
    "Ben, come and help me with this.", "I think the dog wants to go out.",
    "Your mother called this afternoon.", "I love the smell of fresh bread.",
    "Let's sit by the window.", "Somebody left the gate open.",
    # Imperatives and questions meant for someone else: the toy's one spoken request is "Count
    # from ... to ...", and with few imperative asides the state head took "Wait for me at the
    # station." for a request (2026-12-07).
    "Close the door behind you.", "Go and brush your teeth.", "Call your grandmother tonight.",
    "Take the dog out for a walk.", "Ask your teacher about the homework.",
    "Leave the bags in the hall.", "Finish your vegetables first.", "Turn off the lights, please.",
    "Meet me outside the bank at noon.", "Bring me a glass of water.", "Keep the change.",
    "Tell Lisa I will be late.", "Find your coat, we are leaving.", "Sit down and eat your soup.",
    "Check the mail on your way in.", "Wake me up at seven tomorrow.", "Try the other key.",
    "Show me the photos from the trip.", "Watch out for the step.", "Open the window a little.",
    "Write your name on the form.", "Buy some apples at the market.", "Get your shoes on, Sam.",
    "Remember to water the roses.", "Send me the address later.", "Pick a card, any card.",
    "Slow down, the road is icy.", "Help your brother with his bike.", "Put the milk back in the fridge.",
    "Let the cat in, it is raining.", "Save me a seat on the bus.", "Take an umbrella with you.",
    "Peter, what time is the game?", "Where are you going, Emma?", "How was school today, honey?",
    "Are you done with the car?", "Is anybody home?", "Who is at the door?",
    "Why is the radio so loud?", "When does your train leave?", "Jack, have you seen my wallet?",
    "Could you lend me a pen?", "Will you be home for dinner?", "Do we have any more tea?",
    "The kettle is making a strange noise.", "Our flight was delayed by an hour.",
    "The new neighbors seem very nice.", "I parked the car behind the house.",
    "The library is closed on Mondays.", "He never answers his phone.", "The cake needs ten more minutes.",
    "I found your scarf under the sofa.", "It is much colder than yesterday.",
    "The game starts after the news.", "Someone is knocking on the window.", "My shoes are still wet.",
    "The store was out of fresh bread.", "We got a letter from the bank.",
    "The bathroom light keeps flickering.", "I think the milk has gone bad.",
)

# One read sentence per entity, templates taken in turn (heard by the ASR stages only).
_READ_TEMPLATES = {
    "country": ("My aunt went to {} last summer.", "We watched a film about {} yesterday.",
                "Her best friend was born in {}."),
    "city": ("The flight to {} was late.", "He sent me a postcard from {}.",
             "They lived in {} for two years."),
    "thing": ("I drew {} on a big sheet of paper.", "The picture shows {} and nothing else.",
              "She wrote a short poem about {}."),
    "color": ("Her new bag is {}.", "He painted the front door {}.", "I would like a {} shirt."),
    "word": ("He wrote the word {} on the board.", "The next word on the list is {}.",
             "She said {} very clearly."),
}


@dataclasses.dataclass(frozen=True)
class QA:
    """One question/answer pair; ``id`` is stable (it names the content, not a position)."""
    id: str
    category: str
    question: str
    answer: str
    split: str = "train"


@dataclasses.dataclass(frozen=True)
class Aside:
    """An utterance not addressed to the assistant (state 2)."""
    id: str
    text: str
    split: str = "train"


@dataclasses.dataclass(frozen=True)
class Turn:
    """One user turn of a dialogue; ``answer`` is None when the turn is not addressed."""
    id: str
    text: str
    answer: str | None

    @property
    def addressed(self) -> bool:
        return self.answer is not None


@dataclasses.dataclass(frozen=True)
class World:
    seed: int
    qa: tuple[QA, ...]
    asides: tuple[Aside, ...]
    read: tuple[str, ...]

    def split(self, name: str) -> tuple[QA, ...]:
        return tuple(p for p in self.qa if p.split == name)

    def asides_of(self, name: str) -> tuple[Aside, ...]:
        return tuple(a for a in self.asides if a.split == name)


def qa_pairs() -> list[QA]:
    """Every Q&A pair of the world, in a fixed order; arithmetic answers are computed."""
    pairs = []
    for a in range(1, 10):
        for b in range(1, 10):
            for cat, op, value in (("plus", "plus", a + b), ("minus", "minus", a - b), ("times", "times", a * b)):
                if cat == "minus" and a < b:
                    continue
                pairs.append(QA(f"{cat}/{a}/{b}", cat, f"What is {spell(a)} {op} {spell(b)}?",
                                f"{capitalize(spell(a))} {op} {spell(b)} is {spell(value)}."))
    for country, city in CAPITALS:
        pairs.append(QA(f"capital/{country}", "capital", f"What is the capital of {country}?",
                        f"The capital of {country} is {city}."))
    for thing, color in COLORS:
        pairs.append(QA(f"color/{thing}", "color", f"What color is {thing}?", f"{capitalize(thing)} is {color}."))
    for word, opposite in OPPOSITES:
        pairs.append(QA(f"opposite/{word}", "opposite", f"What is the opposite of {word}?",
                        f"The opposite of {word} is {opposite}."))
    for start in range(1, 13):
        for length in (3, 4, 5):
            numbers = [spell(n) for n in range(start, start + length)]
            pairs.append(QA(f"counting/{start}/{length}", "counting",
                            f"Count from {numbers[0]} to {numbers[-1]}.", capitalize(", ".join(numbers)) + "."))
    return pairs


def read_sentences() -> list[str]:
    """Templated sentences naming every country, city, thing, color and opposite-word once, then
    word lists ("The words on the list are a, b, c, d and e.") of the asides' remaining words."""
    entities = ([("country", c) for c, _ in CAPITALS] + [("city", c) for _, c in CAPITALS]
                + [("thing", t) for t, _ in COLORS] + [("color", c) for c in dict.fromkeys(c for _, c in COLORS)]
                + [("word", w) for w in dict.fromkeys(w for pair in OPPOSITES for w in pair)])
    out, used = [], defaultdict(int)
    for kind, name in entities:
        templates = _READ_TEMPLATES[kind]
        out.append(templates[used[kind] % len(templates)].format(name))
        used[kind] += 1
    covered = {w for s in out + [p.question for p in qa_pairs()] for w in normalize(s).split()}
    rest = sorted({w for a in ASIDES for w in normalize(a).split()} - covered)
    for i in range(0, len(rest), 5):
        group = rest[i:i + 5]
        out.append(WORD_LIST_PREFIX + (", ".join(group[:-1]) + " and " if len(group) > 1 else "")
                   + group[-1] + ".")
    return list(dict.fromkeys(out))


def _held_out(ids: Sequence[str], rng: random.Random, fraction: float) -> set[str]:
    ids = sorted(ids)
    rng.shuffle(ids)
    return set(ids[:max(1, round(fraction * len(ids)))])


def make_world(seed: int = 0, test_fraction: float = TEST_FRACTION) -> World:
    """The world with its train/test split, stratified by category (asides are one more stratum)."""
    rng = random.Random(seed)
    pairs = qa_pairs()
    test = set()
    for cat in CATEGORIES:
        test |= _held_out([p.id for p in pairs if p.category == cat], rng, test_fraction)
    qa = tuple(dataclasses.replace(p, split="test" if p.id in test else "train") for p in pairs)
    aside_ids = [f"aside/{i}" for i in range(len(ASIDES))]
    test_asides = _held_out(aside_ids, rng, test_fraction)
    asides = tuple(Aside(i, t, "test" if i in test_asides else "train") for i, t in zip(aside_ids, ASIDES))
    return World(seed, qa, asides, tuple(read_sentences()))


# --- records built from the world ---------------------------------------------------------------

def chat(*turns: tuple[str, str]) -> list[dict[str, str]]:
    """[(user, assistant), ...] -> ChatML-style messages."""
    return [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]


def skill_tasks(kind: str, sentences: Sequence[str]) -> list[tuple[str, str, str]]:
    """(kind, prompt, response) for the text LLM: ``transcribe`` or ``repeat`` each sentence."""
    prefix = {"transcribe": TRANSCRIBE_PREFIX, "repeat": REPEAT_PREFIX}[kind]
    return [(kind, prefix + s, s) for s in dict.fromkeys(sentences)]


def dialogues(qa: Sequence[QA], asides: Sequence[Aside], seed: int, rounds: int = 1,
              aside_rate: float = 0.25, max_questions: int = 3) -> list[tuple[Turn, ...]]:
    """Dialogues of 1..max_questions questions; every question appears once per round.

    Each round shuffles the questions and cuts them into dialogues of random length; with
    probability ``aside_rate`` an aside (if any) is inserted before each question, and a
    dialogue may end with one. Asides are dealt from a shuffled deck (reshuffled when empty), so
    each is heard equally often, +-1: drawn with replacement, one of a test split's 15 asides
    made 5 of its 27 aside turns. Order and composition depend on ``seed`` only.
    """
    rng = random.Random(f"dialogues/{seed}")
    out = []
    deck: list[Aside] = []

    def deal() -> Aside:
        if not deck:
            deck.extend(rng.sample(list(asides), len(asides)))
        return deck.pop()

    for _ in range(rounds):
        order = list(qa)
        rng.shuffle(order)
        i = 0
        while i < len(order):
            n = rng.randint(1, max_questions)
            turns = []
            for p in order[i:i + n]:
                if asides and rng.random() < aside_rate:
                    a = deal()
                    turns.append(Turn(a.id, a.text, None))
                turns.append(Turn(p.id, p.question, p.answer))
            if asides and rng.random() < aside_rate / 2:
                a = deal()
                turns.append(Turn(a.id, a.text, None))
            out.append(tuple(turns))
            i += n
    return out


def text_records(world: World, rounds: int = 2) -> list[dict]:
    """The text LLM's training mix: all Q&A, multi-turn dialogues over all Q&A, skill tasks.

    Transcription covers every sentence the speech-in stages may hear (all questions, asides
    and read sentences), so it is a skill over the whole world's spoken text; repetition covers
    the answers. Each record has a ``kind``: qa, dialogue, transcribe or repeat.
    """
    recs = [{"kind": "qa", "id": p.id, "messages": chat((p.question, p.answer))} for p in world.qa]
    for d in dialogues(world.qa, (), world.seed, rounds=rounds):
        if len(d) > 1:
            recs.append({"kind": "dialogue", "messages": chat(*[(t.text, t.answer) for t in d])})
    heard = [p.question for p in world.qa] + [a.text for a in world.asides] + list(world.read)
    tasks = skill_tasks("transcribe", heard) + skill_tasks("repeat", [p.answer for p in world.qa])
    recs += [{"kind": kind, "messages": chat((q, a))} for kind, q, a in tasks]
    return recs
