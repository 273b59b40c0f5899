from ppruntime.cli import main

raise SystemExit(main())
