"""Validates JSON instances against component schemas of a contract, with the `jsonschema`
package (an independent JSON Schema implementation), as tests/it/contracts.rs asks:

    python3 validate_instances.py CHECKS.json

CHECKS.json is {"components": {name: schema}, "checks": [{"schema": name, "instances": [...]}]};
each schema is checked under draft 2020-12 with `$ref`s resolved against the components. Prints
each invalid instance with why; exits 1 if any is invalid, 0 otherwise.
"""
import json
import sys

from jsonschema import Draft202012Validator


def main(path):
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    components = spec["components"]
    failed = 0
    for check in spec["checks"]:
        root = {"$ref": "#/components/schemas/" + check["schema"], "components": {"schemas": components}}
        Draft202012Validator.check_schema(root)
        validator = Draft202012Validator(root)
        for i, instance in enumerate(check["instances"]):
            errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
            for error in errors[:3]:
                failed += 1
                where = "/".join(str(p) for p in error.absolute_path)
                print(f"{check['schema']} instance {i} at /{where}: {error.message[:300]}")
        print(f"{check['schema']}: {len(check['instances'])} instances checked")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
