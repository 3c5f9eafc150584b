"""`python -m circuits.proxystack --config FILE`: what the operator runs."""
from circuits.proxystack.main import main

if __name__ == "__main__":
    main()
