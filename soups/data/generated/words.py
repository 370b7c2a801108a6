"""Vocabulary shared by the generated tasks: names, countable items, containers."""

NAMES = (
    "Tom", "Anna", "Ben", "Lucy", "Sam", "Mia", "Jack", "Emma", "Leo", "Nora", "Max", "Ella",
    "Omar", "Zoe", "Ivan", "Ruby", "Hugo", "Lily", "Finn", "Grace", "Adam", "Ivy", "Noah",
    "Sara", "Owen", "Maya", "Eli", "Chloe", "Luke", "Rosa",
)

# (plural noun, container that holds several of them)
ITEMS = (
    ("apples", "bags"), ("books", "boxes"), ("marbles", "jars"), ("stickers", "sheets"),
    ("pencils", "packs"), ("cookies", "trays"), ("stamps", "albums"), ("coins", "purses"),
    ("shells", "buckets"), ("cards", "decks"), ("eggs", "cartons"), ("flowers", "vases"),
    ("candies", "bowls"), ("balloons", "bunches"), ("buttons", "tins"), ("crayons", "cases"),
    ("oranges", "crates"), ("toys", "chests"), ("beads", "strings"), ("pears", "baskets"),
)

PLACES = ("the market", "the park", "school", "the library", "the beach", "the shop", "home")
