"""Build the tokenizer of the built-in model `tinkex/tiny-qwen3`, deterministically and offline.

    python scripts/build_tiny_tokenizer.py            # writes src/tinkex/engine/assets/tiny-qwen3/
    python scripts/build_tiny_tokenizer.py --check    # fails if the shipped files differ from a rebuild

The tokenizer imitates Qwen's where it matters to chat renderers (see
/work/shared/reference/cookbook_and_models.md §2.3-2.4): byte-level BPE with Qwen's split regex
(single digits, contractions) followed by ByteLevel(use_regex=False); `<|endoftext|>`,
`<|im_start|>` and `<|im_end|>` are special; `<think>` / `</think>` and the tool tags are ordinary
added tokens, so renderers that encode message text with special-token splitting keep them whole.

The training corpus is generated here from hand-written word lists and templates with a seeded
random generator: English sentences, arithmetic such as `12+7=19`, Q/A lines and ChatML chats.
Only `tokenizer.json` and `tokenizer_config.json` are shipped (the package data takes json/txt).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parents[1] / "src" / "tinkex" / "engine" / "assets" / "tiny-qwen3"
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Non-special added tokens: they are matched whole but never stripped by skip_special_tokens.
PLAIN_ADDED_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 8192
# Qwen2/Qwen3's pre-tokenizer pattern.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# --- corpus -------------------------------------------------------------------------------------

SENTENCES = """\
The small model learns one token at a time.
A quiet river runs past the old mill every morning.
Please write the answer on a new line.
She counted the apples twice before she sold them.
The train leaves at seven and arrives before noon.
We keep the checkpoints so that training can resume later.
His garden has tomatoes, beans, peppers and a single tall sunflower.
If the loss goes down, the learning rate is probably fine.
The cat slept on the warm stone wall all afternoon.
Every question deserves a short and honest answer.
They built a bridge out of wood, rope and patience.
Numbers are easy to add when you line up the digits.
The library opens at nine on weekdays and at ten on Sundays.
A good teacher explains the same idea in three different ways.
Rain is expected tonight, so bring an umbrella tomorrow.
The robot picked up the red block and placed it on the blue one.
I think the first step is to read the whole problem carefully.
Let me check the result once more before I reply.
Our team meets on Tuesday to plan the next experiment.
The recipe needs two eggs, a cup of flour and some milk.
Mountains look closer than they are when the air is clear.
He forgot his keys, so he waited by the door for an hour.
The server answers each request in the order it arrived.
Short sentences are easier to remember than long ones.
You can stop the program at any time by pressing the button.
The children sang a song about the moon and the stars.
Water boils at a lower temperature high in the mountains.
This story is about a fox who wanted to learn to count.
The answer is correct, but the explanation could be clearer.
It was the coldest winter anyone in the village could remember.
"""


# A broad hand-written vocabulary so that BPE finds ~2k merges of real English pieces.
NOUNS = """
account acid afternoon age air airport animal answer apple arm army art article autumn baby back
bag ball band bank bar basket bath battle beach bean bear bed bee beer bell belt bench bicycle bird
birthday blade blanket block blood board boat body bone book border bottle bottom bowl box boy brain
branch bread breakfast brick bridge brother brush bucket building bus butter button cabin cake camera
camp candle cap car card carpet castle cat cave chain chair chalk chance change cheese chicken child
church circle city class clock cloud coat coffee coin color comb computer cook corner cotton country
cousin cow cream crowd cup curtain cushion dance daughter day deer desk dinner doctor dog doll door
dragon drawer dream dress drink drum duck dust eagle ear earth egg engine evening eye face factory
family farm father feather fence field finger fire fish flag flame floor flower fog food foot forest
fork fox friend frog fruit game garden gate gift girl glass glove goat gold grape grass ground group
guitar hair hall hammer hand harbor hat head heart hill history hole holiday honey horse hospital
hotel hour house ice idea island jacket jam jar jelly journey juice kettle key king kitchen kite knee
knife ladder lake lamp language leaf leg lemon lesson letter library light line lion lip list lock
machine magnet market meal meat medicine meeting memory metal milk minute mirror money monkey month
moon morning mother mountain mouse mouth music nail name neck needle nest net night nose note number
ocean office oil onion orange oven owl page paint pair pan paper park party pen pencil pepper person
piano picture pie pig pillow pipe planet plant plate pocket poem pond potato pot queen question rabbit
rain rainbow river road rock roof room root rope rose ruler salt sand school science sea season seat
seed shadow sheep shelf shell ship shirt shoe shop shoulder signal silver singer sister skin sky sleep
snake snow soap sock soup space spoon spring square stage star station stick stone storm street
string sugar summer sun supper table tail teacher team tent test thread ticket tiger time toe tomato
tongue tool tooth tower town toy tree truck turtle umbrella uncle valley vegetable village voice
wall watch water wave weather week wheel whistle wind window wing winter wolf woman wood word world
worm yard year zebra zoo problem result method system program function variable value model token
vector matrix gradient weight error loss reward policy sample batch step epoch dataset prompt reply
"""
VERBS_PLAIN = """
accept add agree allow answer appear arrive ask bake begin believe borrow break bring build burn buy
call carry catch change check choose clean climb close collect come cook copy count cover cross cry
cut dance decide deliver describe dig discover divide draw dream drink drive drop eat enjoy enter
explain fall feed feel fill find finish fit fix fly fold follow forget forgive freeze give grow guess
hang happen hate hear help hide hit hold hope hunt hurry imagine improve include invite join jump
keep kick kill knock know laugh lead learn leave lend lift like listen live look lose love make mark
measure meet mix move need notice obey offer open order own paint pass pay pick plan plant play point
pour practice prefer prepare press print promise protect pull push reach read receive remember repeat
reply rest return ride ring rise roll run save say search see sell send share shout show sing sit
sleep slide smell smile solve sort speak spell spend stand start stay steal stop study swim take talk
teach tell thank think throw touch train travel try turn understand use visit wait walk want warn
wash watch wave wear win wish wonder work worry write
"""
ADJECTIVES = """
able angry awake bad beautiful big bitter black blue bold brave bright broad broken brown busy calm
careful cheap clean clear clever close cold cool correct crazy cruel curious dangerous dark dead deep
different difficult dirty dry early easy empty equal exact excellent fair famous fast fat few fine
flat fresh friendly full funny gentle glad golden good gray great green happy hard healthy heavy
helpful high hollow honest hot huge hungry important kind large late lazy light little lonely long
loud lovely low lucky main modern narrow near neat new nice noisy odd old open orange pale perfect
pink plain polite poor popular pretty proud purple quick quiet rare raw ready real red rich right
rough round sad safe sharp short shy silent silly simple slow small smooth soft sour special square
steep sticky strange strict strong sudden sweet tall thick thin tidy tiny tired true ugly useful warm
weak wet white whole wide wild wise wooden wrong yellow young
"""

SUBJECTS = ["The teacher", "A student", "My friend", "The old farmer", "Our neighbor", "The pilot",
            "A young girl", "The doctor", "Everyone", "The baker", "A tired runner", "The captain",
            "The model", "The engineer", "My sister", "His brother", "The little dog", "A curious child"]
VERBS = ["found", "opened", "painted", "carried", "cleaned", "counted", "fixed", "watched", "wrote",
         "read", "shared", "moved", "bought", "sold", "borrowed", "lost", "noticed", "described"]
OBJECTS = ["a green box", "the letter", "three small stones", "the kitchen door", "a long story",
           "the map of the city", "an empty bottle", "the broken clock", "two red apples", "the garden gate",
           "a blue notebook", "the answer", "a paper boat", "the last page", "a warm blanket", "the window"]
PLACES = ["in the morning", "after dinner", "near the lake", "at school", "on the train", "before the storm",
          "during the lesson", "at the market", "in the evening", "by the fire", "under the bridge", "at home"]
TOPICS = ["rivers", "numbers", "birds", "trains", "stars", "gardens", "music", "bread", "maps", "clocks"]
NAMES = ["Alice", "Bob", "Carol", "Dmitri", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas"]
WORD_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _sentences(rng: random.Random, n: int) -> list[str]:
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."
            for _ in range(n)]


def _inflect(verb: str) -> list[str]:
    """Past tense and -ing forms with the usual spelling rules (irregular verbs come out regular: fine for BPE)."""
    stem = verb[:-1] if verb.endswith("e") else verb
    if verb.endswith("e"):
        past = verb + "d"
    elif verb.endswith("y") and verb[-2] not in "aeiou":
        past = verb[:-1] + "ied"
    else:
        past = verb + "ed"
    return [past, stem + "ing", verb + "s"]


def _word_sentences(rng: random.Random, n: int) -> list[str]:
    nouns, adjectives = NOUNS.split(), ADJECTIVES.split()
    verbs = [form for verb in VERBS_PLAIN.split() for form in [verb, *_inflect(verb)]]
    lines = []
    for _ in range(n):
        a, b = rng.choice(adjectives), rng.choice(adjectives)
        x, y = rng.choice(nouns), rng.choice(nouns)
        pattern = rng.randrange(5)
        if pattern == 0:
            lines.append(f"The {a} {x} {rng.choice(verbs)} the {b} {y}.")
        elif pattern == 1:
            lines.append(f"{rng.choice(NAMES)} {rng.choice(verbs)} a {a} {x} {rng.choice(PLACES)}.")
        elif pattern == 2:
            lines.append(f"Why is the {x} so {a}? Because the {y} is {b}.")
        elif pattern == 3:
            lines.append(f"{x.capitalize()}s and {y}s, {a} and {b}: {rng.choice(verbs)}, {rng.choice(verbs)}.")
        else:
            lines.append(f"I {rng.choice(verbs)} that {x} because it was {a}, not {b}.")
    return lines


def _arithmetic(rng: random.Random, n: int) -> list[str]:
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(f"{a}{op}{b}={value}" if rng.random() < 0.5 else f"{a} {op} {b} = {value}")
    return lines


def _questions(rng: random.Random, n: int) -> list[str]:
    lines = []
    for _ in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        kind = rng.randrange(4)
        if kind == 0:
            lines.append(f"Q: What is {a} plus {b}?\nA: {a + b}")
        elif kind == 1:
            lines.append(f"Question: How many legs do {WORD_NUMBERS[a % 11]} birds have?\n"
                         f"Answer: {2 * (a % 11)}")
        elif kind == 2:
            lines.append(f"Q: Who likes {rng.choice(TOPICS)}?\nA: {rng.choice(NAMES)} does.")
        else:
            lines.append(f"Q: Is {a} larger than {b}?\nA: {'Yes' if a > b else 'No'}.")
    return lines


def _chats(rng: random.Random, n: int) -> list[str]:
    chats = []
    for _ in range(n):
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        name = rng.choice(NAMES)
        user = rng.choice([f"What is {a}+{b}?", f"Hi, I am {name}. Can you help me?",
                           f"Tell me something about {rng.choice(TOPICS)}.", "Say hello."])
        reply = rng.choice([f"{a}+{b}={a + b}", f"Of course, {name}. What do you need?",
                            rng.choice(SENTENCES.splitlines()), "Hello!"])
        think = ""
        if rng.random() < 0.3:
            think = "<think>\nThe user asked a question. I should answer briefly.\n</think>\n\n"
        chats.append(f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                     f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{think}{reply}<|im_end|>\n")
    return chats


def corpus() -> list[str]:
    rng = random.Random(0)
    texts = SENTENCES.splitlines() * 4
    texts += _sentences(rng, 2000) + _word_sentences(rng, 12000) + _arithmetic(rng, 3000)
    texts += _questions(rng, 1500) + _chats(rng, 600)
    texts += ["def add(a, b):\n    return a + b\n", '{"name": "tinkex", "steps": 20}\n', "\n\n\n", "    \t  \n"]
    rng.shuffle(texts)
    return texts


# --- tokenizer ----------------------------------------------------------------------------------


def build() -> dict[str, str]:
    """Return {file name: file text} for the tokenizer files."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(PLAIN_ADDED_TOKENS),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED_TOKENS])

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "add_bos_token": False,
        "errors": "replace",
        "chat_template": CHAT_TEMPLATE,
    }
    return {
        "tokenizer.json": tokenizer.to_str(pretty=True) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing")
    parser.add_argument("--out", type=Path, default=ASSET_DIR)
    args = parser.parse_args()
    files = build()
    if args.check:
        stale = [name for name, text in files.items()
                 if not (args.out / name).exists() or (args.out / name).read_text() != text]
        print("stale: " + ", ".join(stale) if stale else "up to date")
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text)
    print(f"wrote {', '.join(files)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
