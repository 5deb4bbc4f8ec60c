from fastdinov2.cli import main

raise SystemExit(main())
